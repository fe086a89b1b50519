"""The neuron atlas (`rangelens report`) and its server (`rangelens serve`): pages, figures, partial
runs, escaping of untrusted text, and path-traversal refusal.

The run directory is a real analysis of a tiny random Llama on a small CSV corpus, plus NeuronScope
explanations made with the offline roles and an erasure stage in the format of
:mod:`rangelens.erasure`. Exemplar texts, tokens, concept labels and explanations carry HTML and
``<script>`` on purpose.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape
from typer.testing import CliRunner

from rangelens.activations.models import LoadedModel
from rangelens.cli import app
from rangelens.config import AnalysisConfig, ErasureConfig, RunConfig
from rangelens.erasure.outputs import interval_text
from rangelens.errors import RangelensError
from rangelens.explain import explain_record, records_from_activations, save_results
from rangelens.explain.offline import offline_roles
from rangelens.pipeline import run as run_pipeline
from rangelens.report import build_atlas, make_server
from rangelens.report.atlas import atlas_is_current
from rangelens.report.figures import Series, histogram_svg, nice_ticks
from rangelens.report.server import AtlasServer, resolve_request, serve

SCRIPT_TEXT = '<script>alert("exemplar")</script><b>bold</b> & "quoted"'
SCRIPT_TOKEN = "<script>alert(1)</script>"
EVIL_EXPLANATION = (
    '<img src=x onerror="alert(2)">fires on sports words</p><script>alert(3)</script>'
)
EVIL_LABEL = "<i>tech</i> & co"
TOPICS = {
    "sport": ["The striker scored twice in the league match", "A late goal won the cup final"],
    "money": ["Shares fell as the bank raised interest rates", "Profits rose at the retail group"],
    EVIL_LABEL: ["The new phone has a faster chip and camera", "Software update fixes a bug"],
}
WORDS = ["the", "a", "of", "match", "goal", "team", "market", "shares", "bank", SCRIPT_TOKEN]


def _corpus(path: Path) -> Path:
    rows = [
        {"text": f"{t} ({i})", "topic": label}
        for label, texts in TOPICS.items()
        for i in range(6)
        for t in texts
    ]
    rows[0]["text"] = SCRIPT_TEXT
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _explanations(directory: Path, neurons: list[int], site: str) -> None:
    """Offline NeuronScope explanations of ``neurons`` from synthetic token activations."""
    rng = np.random.default_rng(0)
    strength = {"goal": 3.0, "match": 2.5, "team": 2.0, "shares": 1.5, SCRIPT_TOKEN: 2.2}
    tokens, offsets = [], [0]
    for _ in range(120):
        tokens += [f" {w}" for w in rng.choice(WORDS, size=10)]
        offsets.append(len(tokens))
    base = np.array([strength.get(t.strip(), 0.0) for t in tokens])
    values = np.stack(
        [base + rng.normal(0, 0.05, len(base)) * (k + 1) for k in range(len(neurons))]
    )
    kind, layer = site.split(".")
    records = records_from_activations(
        values.T,
        np.array([WORDS.index(t.strip()) for t in tokens]),
        tokens,
        np.array(offsets),
        neurons,
        model="tiny-llama",
        site=kind,
        layer=int(layer),
    )
    results = [explain_record(r, offline_roles(), rounds=1) for r in records]
    results[0].modes[0].explanation = EVIL_EXPLANATION
    save_results(directory, records, results, {"model": "tiny-llama", "site": site})


def make_report_run(root: Path, lm: LoadedModel) -> Path:
    """A run directory with every stage the atlas shows."""
    config = AnalysisConfig(
        model="tiny-llama",
        dataset=str(_corpus(root / "topics.csv")),
        label_column="topic",
        p=0.25,
        max_length=32,
        taus=[1.0],
    )
    run = root / "run"
    erasure = ErasureConfig(folds=2, bootstrap=200, ppl_texts=0)  # a real erasure stage
    result = run_pipeline(
        RunConfig(out=run, analysis=config, erasure=erasure), lm=lm, progress=False
    )
    salient = sorted({int(j) for j in result.analysis.range_map.neurons[:, :2].ravel()})[:2]
    _explanations(run / "explanations", salient, result.analysis.capture.info["site"])
    return run


_SHARED: dict[str, Path] = {}


def shared_report_run(factory: pytest.TempPathFactory, lm: LoadedModel) -> Path:
    """:func:`make_report_run`, once per session (the browser tests use the same run)."""
    if "run" not in _SHARED:
        _SHARED["run"] = make_report_run(factory.mktemp("report"), lm)
    return _SHARED["run"]


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: LoadedModel) -> Path:
    return shared_report_run(tmp_path_factory, tiny_llama)


@pytest.fixture(scope="module")
def atlas(report_run: Path) -> Path:
    return build_atlas(report_run)


def pages(atlas: Path) -> dict[str, str]:
    return {str(p.relative_to(atlas)): p.read_text(encoding="utf-8") for p in atlas.rglob("*.html")}


def test_atlas_has_every_page_and_figure(atlas: Path, report_run: Path) -> None:
    assert atlas == report_run / "atlas"
    manifest = json.loads((atlas / "atlas.json").read_text())
    assert manifest["format"] == "rangelens.atlas/1" and manifest["missing"] == []
    assert atlas_is_current(report_run, atlas)
    site = pages(atlas)
    for name in ("index", "concepts", "neurons", "erasure", "explanations"):
        assert f"{name}.html" in site
    from rangelens.ranges.maps import RangeMap

    salient = {int(j) for j in RangeMap.load(report_run / "ranges").neurons.ravel()}
    assert {f"neurons/{j}.html" for j in salient} <= set(site)
    assert manifest["pages"] == len(site)
    for name in ("overlap", "polysemanticity", "explanation_scores"):
        assert (atlas / "figures" / f"{name}.svg").is_file()
        assert (atlas / "figures" / f"{name}.png").is_file()
    for name in ("erasure_bars.png", "tau_tradeoff.png"):
        assert (atlas / "figures" / name).is_file() and f'src="figures/{name}"' in site[
            "erasure.html"
        ]
    assert "Concept distributions on the salient neurons" in site["index.html"]
    erasure = site["erasure.html"]
    saved = json.loads((report_run / "erasure" / "erasure.json").read_text())
    average = next(r for r in saved["headline"] if r["concept"] == "average")
    assert "Erased ranges" in erasure and interval_text(average, "range_target_drop") in erasure
    assert str(escape(saved["info"]["verdict"]))[:60] in erasure
    assert "&lt;i&gt;tech&lt;/i&gt;" in erasure and "<i>tech</i>" not in erasure
    j = min(salient)
    assert f'href="neurons/{j}.html"' in erasure
    page = site[f"neurons/{j}.html"]
    assert page.count('<g class="band"') >= 1 and page.count('<g class="series"') == 3
    assert "Texts at the extremes" in page
    explained = json.loads((report_run / "explanations" / "results.json").read_text())
    for n in explained["neurons"]:
        assert "Explanation" in site[f"neurons/{n['neuron']}.html"]
        assert f'href="neurons/{n["neuron"]}.html"' in site["explanations.html"]
    assert site["neurons.html"].count("<tr data-concepts=") == len(salient)


def test_atlas_is_self_contained(atlas: Path) -> None:
    for name, html in pages(atlas).items():
        refs = re.findall(r'(?:src|href)="([^"]*)"', html)
        assert 'href="data:,"' in html  # the (empty) favicon: no request leaves the page
        for ref in (r for r in refs if r != "data:,"):
            assert not re.match(r"^[a-z]+:|^//", ref), (name, ref)
            target = (atlas / name).parent / ref.split("?")[0]
            assert target.exists(), (name, ref)
    for asset in (atlas / "static").iterdir():
        text = asset.read_text()
        assert "http://" not in text and "https://" not in text and "@import" not in text


def test_untrusted_text_is_escaped(atlas: Path) -> None:
    for name, html in pages(atlas).items():
        # the only script is the bundled one; no handler attribute came through
        assert re.findall(r"<script[^>]*>", html) == [
            f'<script src="{"../" * name.count("/")}static/atlas.js" defer>'
        ], name
        assert not re.search(r"<[^>]*\son\w+=", html), name  # no event-handler attribute
        assert "<b>bold</b>" not in html and "<i>tech</i>" not in html and "<img src=x" not in html
    site = pages(atlas)
    assert any("&lt;script&gt;alert(&#34;exemplar&#34;)&lt;/script&gt;" in p for p in site.values())
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in p for p in site.values())
    assert "&lt;img src=x onerror=" in "".join(site.values())
    assert "&lt;i&gt;tech&lt;/i&gt; &amp; co" in site["index.html"]


def test_partial_runs_render_what_exists(report_run: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(report_run, partial, ignore=shutil.ignore_patterns("atlas"))
    for stage in ("ranges", "erasure", "explanations"):
        shutil.rmtree(partial / stage)
    site = pages(build_atlas(partial))
    assert "ranges/ is missing" in site["index.html"]
    assert "erasure/ is missing" in site["index.html"]
    assert "explanations/ is missing" in site["index.html"]
    assert "not in this run" in site["neurons.html"] and "not in this run" in site["erasure.html"]
    assert not any(name.startswith("neurons/") for name in site)
    shutil.rmtree(partial / "capture")
    (partial / "ranges").mkdir()  # an empty stage directory is reported, not fatal
    site = pages(build_atlas(partial, tmp_path / "elsewhere"))
    assert "capture/ is missing" in site["index.html"]
    assert "ranges/ has no ranges.json" in site["index.html"]


def test_explanations_of_another_site_get_their_own_pages(report_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    _explanations(other, [3], "mlp.1")
    site = pages(build_atlas(report_run, tmp_path / "atlas", explanations=other))
    assert "explained/3.html" in site and "no concept statistics" in site["explained/3.html"]
    assert "of site &#39;mlp.1&#39;" in site["index.html"]


def test_bad_run_directories_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(RangelensError, match="does not exist"):
        build_atlas(tmp_path / "nope")
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(RangelensError, match="not a rangelens run"):
        build_atlas(tmp_path / "not-a-run")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_report_command_prints_the_atlas(report_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(report_run), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "index.html" in result.output and (tmp_path / "a" / "index.html").is_file()


def test_atlas_goes_stale_when_the_run_changes(report_run: Path, tmp_path: Path) -> None:
    out = build_atlas(report_run, tmp_path / "atlas")
    assert atlas_is_current(report_run, out)
    results = report_run / "explanations" / "results.json"
    original = results.read_text()
    try:
        results.write_text(original.replace('"tiny-llama"', '"tiny-llama-2"', 1))
        assert not atlas_is_current(report_run, out)
    finally:
        results.write_text(original)


def test_histogram_svg_draws_counts_gaussians_and_bands() -> None:
    edges = np.linspace(-2.0, 2.0, 9)
    series = [
        Series("<b>a</b>", 0, np.array([0, 1, 4, 6, 4, 1, 0, 0]), -0.25, 0.8, ((-1.85, 1.35),)),
        Series("b", 1, np.array([0, 0, 0, 0, 1, 3, 1, 0]), 0.9, 0.0, None),
    ]
    svg = str(histogram_svg(edges, series))
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"') and svg.endswith("</svg>")
    assert svg.count("<polygon") == 2 and svg.count('stroke-dasharray="5 3"') == 1  # std 0: none
    assert svg.count('<g class="band"') == 1 and "&lt;b&gt;a&lt;/b&gt; range [-1.85, 1.35]" in svg
    assert "<b>" not in svg
    assert svg.count('class="bin"') == 6  # a hover tooltip per non-empty bin
    assert "[0.5, 1)\n&lt;b&gt;a&lt;/b&gt;: 1\nb: 3" in svg
    assert nice_ticks(0, 1, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] and nice_ticks(3, 3) == [3]


# ------------------------------------------------------------------------------------------- serve


def test_resolve_request_stays_inside_the_atlas(atlas: Path, tmp_path: Path) -> None:
    root = atlas.resolve()
    assert resolve_request(root, "/") == root / "index.html"
    assert resolve_request(root, "/neurons.html?concept=1#x") == root / "neurons.html"
    assert resolve_request(root, "/static/atlas.css") == root / "static" / "atlas.css"
    (atlas / "escape").symlink_to(atlas.parent / "run.json")
    (atlas / "escape-dir").symlink_to(atlas.parent, target_is_directory=True)
    try:
        for bad in (
            "/../run.json",
            "/static/../../run.json",
            "/%2e%2e/run.json",
            "/%2E%2E%2Frun.json",
            "/..%2frun.json",
            "/static/%2e%2e%2f%2e%2e%2frun.json",
            "/%252e%252e/run.json",
            "/..\\run.json",
            "/static/..%5c..%5crun.json",
            "//etc/passwd",
            "/etc/passwd",
            "/escape",
            "/escape-dir/run.json",
            "/index.html%00.png",
            "/missing.html",
        ):
            assert resolve_request(root, bad) is None, bad
    finally:
        (atlas / "escape").unlink()
        (atlas / "escape-dir").unlink()


@pytest.fixture(scope="module")
def server(atlas: Path) -> Iterator[tuple[str, int]]:
    httpd = make_server(atlas, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[:2]
    httpd.shutdown()
    httpd.server_close()


def _request(
    address: tuple[str, int], method: str, path: str, host: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    conn.putrequest(method, path, skip_host=host is not None, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def test_server_is_loopback_read_only_and_refuses_traversal(server: tuple[str, int]) -> None:
    assert server[0] == "127.0.0.1"
    status, headers, body = _request(server, "GET", "/")
    assert status == 200 and body.startswith(b"<!doctype html>")
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = _request(server, "HEAD", "/static/atlas.js")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert headers["Content-Type"].startswith("text/javascript")
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = _request(server, method, "/index.html")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    for path in ("/../run.json", "/%2e%2e/run.json", "/%2e%2e%2frun.json", "/..%2f..%2fetc/passwd"):
        status, _, body = _request(server, "GET", path)
        assert status == 404 and b"format" not in body, path
    for host in ("localhost", "LOCALHOST", "LocalHost", "127.0.0.1", "[::1]"):
        status, _, _ = _request(server, "GET", "/", host=f"{host}:{server[1]}")
        assert status == 200, host  # host names compare case-insensitively
    status, _, body = _request(server, "GET", "/", host=f"evil.example:{server[1]}")
    assert status == 403 and b"doctype" not in body  # DNS rebinding


def test_serve_command_builds_the_atlas_and_serves_on_loopback(
    report_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(report_run, run, ignore=shutil.ignore_patterns("atlas"))
    started: list[AtlasServer] = []
    serve_forever = AtlasServer.serve_forever

    def recorded(self: AtlasServer, poll_interval: float = 0.5) -> None:
        started.append(self)
        serve_forever(self, poll_interval)

    monkeypatch.setattr(AtlasServer, "serve_forever", recorded)
    thread = threading.Thread(target=serve, args=(run, "127.0.0.1", 0), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started, "the server did not start"
    try:
        address = started[0].server_address[:2]
        assert address[0] == "127.0.0.1" and atlas_is_current(run, run / "atlas")
        status, _, body = _request(address, "GET", "/neurons.html")
        assert status == 200 and b"neuron-table" in body
    finally:
        started[0].shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_on_a_busy_port_is_a_one_line_error(
    report_run: Path, server: tuple[str, int]
) -> None:
    with pytest.raises(RangelensError, match="cannot listen on 127.0.0.1"):
        serve(report_run, "127.0.0.1", server[1])


def test_atlas_builds_atomically_over_an_old_one(report_run: Path, tmp_path: Path) -> None:
    out = build_atlas(report_run, tmp_path / "atlas")
    (out / "stale.html").write_text("old")
    build_atlas(report_run, out)
    assert not (out / "stale.html").exists() and (out / "index.html").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".atlas")]

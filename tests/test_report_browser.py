"""The atlas in a real browser: Debian's Chromium driven by Playwright against `rangelens serve`'s
server, and from file://. Pages load without console errors, the neuron table filters and sorts, a
neuron page shows its histogram, and untrusted text never runs. Screenshots go to
``tests/artifacts/browser/`` (or ``$RANGELENS_ARTIFACTS``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright
from test_report import shared_report_run

from rangelens.activations.models import LoadedModel
from rangelens.report import build_atlas, make_server

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = (
    Path(os.environ.get("RANGELENS_ARTIFACTS", Path(__file__).parent / "artifacts")) / "browser"
)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Chromium is not installed (apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory, tiny_llama: LoadedModel) -> Path:
    return build_atlas(shared_report_run(tmp_path_factory, tiny_llama))


@pytest.fixture(scope="module")
def base_url(atlas: Path) -> Iterator[str]:
    httpd = make_server(atlas, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield launched
        launched.close()


class Watched:
    """A page that records console errors/warnings, uncaught exceptions and dialogs."""

    def __init__(self, browser: Browser) -> None:
        self.page: Page = browser.new_page(viewport={"width": 1360, "height": 900})
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda err: self.problems.append(f"exception: {err}"))
        self.page.on("dialog", self._dialog)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"{message.type}: {message.text}")

    def _dialog(self, dialog: object) -> None:
        self.problems.append("a dialog opened: injected script ran")
        dialog.dismiss()  # type: ignore[attr-defined]

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    page = Watched(browser)
    yield page
    page.page.close()
    assert page.problems == []


def test_every_page_loads_without_console_errors(
    watched: Watched, base_url: str, atlas: Path
) -> None:
    names = sorted(str(p.relative_to(atlas)) for p in atlas.rglob("*.html"))
    for name in names:
        response = watched.page.goto(base_url + name)
        assert response is not None and response.status == 200, name
        watched.page.wait_for_load_state("load")
    for name in ("index", "concepts", "erasure", "explanations"):
        watched.page.goto(f"{base_url}{name}.html")
        watched.shot(name)


def test_neuron_table_filters_and_sorts(watched: Watched, base_url: str) -> None:
    page = watched.page
    page.goto(base_url + "neurons.html")
    rows = page.locator("#neuron-table tbody tr")
    total = rows.count()
    assert total > 3 and page.locator("#row-count").inner_text() == f"{total} neurons"
    first = rows.nth(0).get_attribute("data-search").split()[0]  # type: ignore[union-attr]
    page.fill("#filter", first)
    visible = page.locator("#neuron-table tbody tr:visible")
    assert 1 <= visible.count() < total
    assert all(first in (r.get_attribute("data-search") or "") for r in visible.all())
    assert page.locator("#row-count").inner_text() == f"{visible.count()} of {total} neurons"
    page.fill("#filter", "no-such-neuron")
    assert visible.count() == 0 and page.locator("#no-rows").is_visible()
    page.fill("#filter", "")
    page.select_option("#concept-filter", "0")
    assert all("0" in (r.get_attribute("data-concepts") or "").split() for r in visible.all())
    page.select_option("#concept-filter", "")
    page.get_by_role("columnheader", name="concepts").click()
    page.get_by_role("columnheader", name="concepts").click()  # descending
    counts = [
        int(c) for c in page.locator("#neuron-table tbody tr td:nth-child(3)").all_inner_texts()
    ]
    assert counts == sorted(counts, reverse=True)
    watched.shot("neurons")


def test_neuron_page_shows_its_histogram(watched: Watched, base_url: str, atlas: Path) -> None:
    page = watched.page
    page.goto(base_url + "neurons.html")
    page.locator("#neuron-table tbody tr a").first.click()
    svg = page.locator("#histogram svg.hist")
    assert svg.is_visible() and svg.bounding_box()["width"] > 400  # type: ignore[index]
    series = page.locator("svg.hist g.series")
    assert series.count() == 3 and page.locator("svg.hist g.band").count() >= 1
    assert page.locator("svg.hist polygon").first.is_visible()
    page.locator("svg.hist g.legend").first.click()  # hides the first concept
    assert not series.first.is_visible() and series.nth(1).is_visible()
    page.locator("svg.hist g.legend").first.click()
    assert series.first.is_visible()
    with page.expect_download() as download:
        page.click("[data-download-svg]")
    assert download.value.suggested_filename.endswith("-histogram.svg")
    watched.shot("neuron")


def test_untrusted_text_shows_as_text(watched: Watched, base_url: str, atlas: Path) -> None:
    page = watched.page
    page.goto(base_url + "explanations.html")
    page.locator("table.sortable tbody tr a").first.click()
    assert page.get_by_text('<img src=x onerror="alert(2)">', exact=False).count() == 1
    assert page.locator("span.tok", has_text="<script>alert(1)</script>").count() > 0
    assert page.locator(".explanation img").count() == 0
    watched.shot("explained-neuron")
    for path in atlas.glob("neurons/*.html"):
        if "&lt;script&gt;alert(&#34;exemplar&#34;)" in path.read_text():
            page.goto(base_url + f"neurons/{path.name}")
            assert page.get_by_text('<script>alert("exemplar")</script><b>bold</b>').count() >= 1
            break
    else:
        pytest.fail("no neuron page shows the <script> exemplar")


def test_atlas_works_from_file_urls(watched: Watched, atlas: Path) -> None:
    page = watched.page
    page.goto((atlas / "neurons.html").as_uri())
    page.fill("#filter", "zzz-none")
    assert page.locator("#no-rows").is_visible()  # the script ran under file://
    page.goto((atlas / "index.html").as_uri())
    assert page.locator("figure img").first.evaluate("img => img.naturalWidth") > 0

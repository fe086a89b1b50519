"""The neuron atlas: a self-contained static site for one run directory.

``RUN_DIR/atlas/`` (written atomically) holds ``index.html`` (the run, what is missing, headline
numbers), ``concepts.html``, ``neurons.html`` (a searchable, sortable table of the salient neurons),
``neurons/<j>.html`` (ranges per concept, histograms, modes with explanations and scores,
exemplars), ``erasure.html``, ``explanations.html``, ``figures/`` (SVG + PNG) and ``static/`` (one
CSS and one JS file). Pages reference only relative paths, so the site works from ``file://`` and
offline; templates autoescape everything, so exemplar text and LLM explanations render as text.
``atlas.json`` records the build (format ``rangelens.atlas/1``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from rangelens.artifacts import ATLAS, atomic_dir, check_output_dir, read_json, write_json
from rangelens.erasure.outputs import interval_text, methods_for
from rangelens.explain.loop import NeuronExplanation
from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.rangeset import overlap_statement
from rangelens.report import figures
from rangelens.report.contents import (
    RunContents,
    check_run_dir,
    concepts_per_neuron,
    default_explanations,
    distribution_overlap,
    load_run,
    salient_overlap,
    source_fingerprint,
)

ATLAS_FORMAT = "rangelens.atlas/1"
PACKAGE_DIR = Path(__file__).parent
N_TEXT_EXEMPLARS = 4
N_TOP_EXEMPLARS, N_QUANTILE_EXEMPLARS = 8, 6  # token-level exemplars shown per explained neuron
SNIPPET_CHARS = 320
HEAT_LEVELS = 9


def atlas_is_current(run_dir: Path, out_dir: Path, explanations: Path | None = None) -> bool:
    """Whether ``out_dir`` holds an atlas built from ``run_dir``'s current contents."""
    manifest = out_dir / "atlas.json"
    if not (manifest.is_file() and (out_dir / "index.html").is_file()):
        return False
    expected = source_fingerprint(run_dir, explanations or default_explanations(run_dir))
    return bool(read_json(manifest).get("source") == expected)


def build_atlas(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    explanations: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write the atlas of ``run_dir`` to ``out_dir`` (default ``RUN_DIR/atlas``); return it.

    Renders whatever stages exist and lists the missing ones on the overview page. Explanations are
    read from ``explanations`` (default ``RUN_DIR/explanations``). An existing ``out_dir`` is
    replaced only if it is an atlas or empty (``force``: also explanations, but never a stage or
    anything inside a run; see :func:`rangelens.artifacts.check_output_dir`).
    """
    start = time.perf_counter()
    run_path = Path(run_dir)
    check_run_dir(run_path)
    out = Path(out_dir) if out_dir is not None else run_path / "atlas"
    explained = Path(explanations) if explanations is not None else default_explanations(run_path)
    check_output_dir(out, ATLAS, force=force, keep=[run_path])
    run = load_run(run_path, explained)
    with atomic_dir(out, ATLAS, force=force, keep=[run_path]) as tmp:
        pages = _Site(run, tmp).render()
        write_json(
            tmp / "atlas.json",
            {
                "format": ATLAS_FORMAT,
                "run_dir": str(run_path.resolve()),
                "source": source_fingerprint(run_path, explained),
                "rangelens": metadata.version("rangelens"),
                "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - start, 2),
                "pages": pages,
                "missing": run.missing,
            },
        )
    return out


@dataclass
class _Neuron:
    """One neuron page: what the neuron is salient for and its explanation, if any. Neurons of the
    analysed site live in ``neurons/``; explained neurons of another site in ``explained/``."""

    neuron: int
    concepts: list[int]
    at_site: bool = True
    explanation: NeuronExplanation | None = None
    record: NeuronRecord | None = None

    @property
    def path(self) -> str:
        """The page, relative to the atlas root."""
        return f"{'neurons' if self.at_site else 'explained'}/{self.neuron}.html"


class _Site:
    """Renders every page of one run's atlas into ``out``."""

    def __init__(self, run: RunContents, out: Path) -> None:
        self.run = run
        self.out = out
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=figures.isolate,  # user text cannot reorder the page around it
        )
        self.env.filters["num"] = figures.fmt
        self.env.filters["fixed"] = figures.fixed
        self.env.filters["pct"] = figures.percent
        self.concepts = run.concepts
        self.rows = self._distribution_rows()
        self.train = set(run.capture.train.tolist()) if run.capture is not None else set()
        self.moments = _moments(run)
        self.neurons = self._neurons()
        self.sections = {
            "concepts": run.ranges is not None,
            "neurons": bool(self.neurons),
            "erasure": run.erasure is not None,
            "explanations": run.explanations is not None,
        }

    # ----------------------------------------------------------------------------- assembly

    def _distribution_rows(self) -> dict[tuple[int, int], dict[str, Any]]:
        """``(concept index, neuron)`` -> its distribution-table row plus its salience score."""
        if self.run.ranges is None:
            return {}
        ranges = self.run.ranges
        index = {name: c for c, name in enumerate(ranges.range_map.concepts)}
        rows = {}
        bands = {
            (c, r.neuron): r.intervals
            for c in range(len(ranges.range_map.concepts))
            for r in ranges.range_map.ranges(c)
        }
        for row in ranges.distribution.to_dict(orient="records"):
            c, j = index[str(row["concept"])], int(row["neuron"])
            intervals = bands[c, j]
            rows[c, j] = {
                **row,
                "score": float(ranges.scores[c, j]),
                "intervals": intervals,
                "band": figures.band_text(intervals),
            }
        return rows

    def _neurons(self) -> list[_Neuron]:
        """The salient neurons, then explained ones that are not salient (or of another site)."""
        run = self.run
        salient = concepts_per_neuron(run.ranges.range_map) if run.ranges is not None else {}
        pages = {j: _Neuron(j, concepts) for j, concepts in salient.items()}
        elsewhere = []
        found = run.explanations
        if found is not None:
            here = run.explained_here()
            for j in sorted(set(found.explanations) | set(found.records)):
                page = pages.setdefault(j, _Neuron(j, [])) if here else _Neuron(j, [], False)
                page.explanation, page.record = found.explanations.get(j), found.records.get(j)
                if not here:
                    elsewhere.append(page)
        return [*sorted(pages.values(), key=lambda p: p.neuron), *elsewhere]

    # ------------------------------------------------------------------------------ rendering

    def render(self) -> int:
        """Write every page, the figures and the static files; return the number of pages."""
        shutil.copytree(PACKAGE_DIR / "static", self.out / "static")
        (self.out / "static" / "palette.css").write_text(_palette_css(len(self.concepts)))
        figs = self._figures()
        common = {"run": self.run, "concepts": self.concepts, "sections": self.sections}
        pages = {
            "index.html": ("overview.html", self._overview(figs)),
            "concepts.html": ("concepts.html", self._concept_pages(figs)),
            "neurons.html": ("neurons.html", self._neuron_table()),
            "erasure.html": ("erasure.html", self._erasure()),
            "explanations.html": ("explanations.html", self._explanation_table(figs)),
        }
        for name, (template, context) in pages.items():
            self._write(name, template, {**common, **context, "page": name.removesuffix(".html")})
        neighbours = [None, *self.neurons, None]
        texts = self._text_exemplars()
        for i, page in enumerate(self.neurons):
            context = {
                **common,
                "page": "neurons",
                "n": page,
                "prev": neighbours[i],
                "next": neighbours[i + 2],
                **self._neuron_detail(page, texts.get(page.neuron, {})),
            }
            self._write(page.path, "neuron.html", context)
        return len(pages) + len(self.neurons)

    def _write(self, path: str, template: str, context: dict[str, Any]) -> None:
        target = self.out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        root = "../" * path.count("/")
        html = self.env.get_template(template).render(root=root, **context)
        target.write_text(html, encoding="utf-8")

    def _figures(self) -> dict[str, str]:
        """Run-level figures that can be drawn from what exists: name -> caption."""
        run, out, made = self.run, self.out / "figures", {}
        if run.ranges is not None:
            rm = run.ranges.range_map
            salient = salient_overlap(rm)
            dist = (
                distribution_overlap(run.capture, rm)
                if run.capture is not None
                else salient * np.nan
            )
            figures.save_figure(figures.overlap_figure(rm.concepts, salient, dist), out, "overlap")
            made["overlap"] = (
                "Concept × concept overlap: shared salient neurons (left) and how much the row "
                "concept's fitted Gaussians overlap the column concept's on its salient neurons "
                "(right; 1 = identical distributions)."
            )
            per_neuron = np.array([len(c) for c in concepts_per_neuron(rm).values()])
            shared = run.ranges.polysemanticity["shared"].to_numpy(dtype=np.float64)
            figures.save_figure(
                figures.polysemanticity_figure(rm.concepts, shared, per_neuron),
                out,
                "polysemanticity",
            )
            made["polysemanticity"] = (
                "Polysemanticity of salient neurons: how many of each concept's salient neurons "
                "are salient for another concept too, and for how many concepts each is salient."
            )
        scored = [p.explanation for p in self.neurons if p.explanation is not None]
        if scored:
            figures.save_figure(
                figures.explanation_scores_figure(
                    np.array([e.single_pass.held_out for e in scored]),
                    np.array([e.iterative.held_out for e in scored]),
                    [e.neuron for e in scored],
                ),
                out,
                "explanation_scores",
            )
            made["explanation_scores"] = (
                "Held-out correlation between simulated and true activations: iterative "
                "NeuronScope modes vs the single-pass explanation (above the diagonal: the "
                "iterative explanation is better)."
            )
        if run.erasure is not None:
            for path in run.erasure.figures:
                shutil.copyfile(path, out / path.name)
        return made

    def _overview(self, figs: dict[str, str]) -> dict[str, Any]:
        run = self.run
        summary = run.ranges.summary.to_dict(orient="records") if run.ranges else []
        counts = (
            dict(zip(run.capture.label_names, run.capture.stats.count.tolist(), strict=True))
            if run.capture
            else {}
        )
        headline = run.erasure.summary.get("headline", []) if run.erasure else []
        average = next((r for r in headline if r.get("concept") == "average"), None)
        stages = {
            name: getattr(run, name) is not None
            for name in ("capture", "ranges", "erasure", "explanations")
        }
        return {
            "figs": figs,
            "summary": summary,
            "train_counts": counts,
            "stages": stages,
            "erasure_average": average,
            "overlap": overlap_statement(run.ranges.summary, len(run.concepts))
            if run.ranges is not None and "overall" in set(run.ranges.summary["concept"])
            else None,
            "n_salient": len(np.unique(run.ranges.range_map.neurons)) if run.ranges else None,
            "k": run.ranges.range_map.neurons.shape[1] if run.ranges else None,
        }

    def _concept_pages(self, figs: dict[str, str]) -> dict[str, Any]:
        run = self.run
        if run.ranges is None:
            return {"figs": figs, "cards": []}
        summary = {str(r["concept"]): r for r in run.ranges.summary.to_dict(orient="records")}
        shared = dict(
            zip(
                run.ranges.polysemanticity["concept"].astype(str),
                run.ranges.polysemanticity["shared"],
                strict=True,
            )
        )
        rm = run.ranges.range_map
        erased = run.erasure.summary if run.erasure is not None else {}
        by_concept = {str(r["concept"]): r for r in erased.get("headline", [])}
        conditions = list(erased.get("info", {}).get("conditions", []))
        cards = []
        for c, name in enumerate(rm.concepts):
            top = [self.rows[c, int(j)] for j in rm.neurons[c, :12]]
            n = int(run.capture.stats.count[c]) if run.capture is not None else None
            cards.append(
                {
                    "index": c,
                    "name": name,
                    "n": n,
                    "summary": summary.get(name),
                    "shared": shared.get(name),
                    "top": top,
                    "methods": methods_for(by_concept[name], conditions)
                    if name in by_concept
                    else None,
                }
            )
        return {"figs": figs, "cards": cards}

    def _neuron_table(self) -> dict[str, Any]:
        rows = []
        for page in self.neurons:
            if not page.at_site:
                continue
            mine = [self.rows[c, page.neuron] for c in page.concepts]
            e = page.explanation
            rows.append(
                {
                    "page": page,
                    "best_rank": min((int(r["rank"]) for r in mine), default=None),
                    "purity": max(
                        (float(r["purity"]) for r in mine if r["purity"] == r["purity"]),
                        default=None,
                    ),
                    "overlap": min((float(r["bhattacharyya_max"]) for r in mine), default=None),
                    "iterative": e.iterative.held_out if e else None,
                    "single_pass": e.single_pass.held_out if e else None,
                    "search": " ".join(
                        [
                            str(page.neuron),
                            *(self.concepts[c] for c in page.concepts),
                            *(m.label for m in (e.modes if e else [])),
                        ]
                    ),
                }
            )
        return {"rows": rows}

    def _erasure(self) -> dict[str, Any]:
        erasure = self.run.erasure
        if erasure is None:
            return {"erasure": None}
        summary = erasure.summary
        info = summary.get("info", {})
        states = list(info.get("conditions", []))
        rows = summary.get("headline", [])
        metrics = ("target_drop", "complement_drop", "complement_flip", "ppl_change")
        headline = pd.DataFrame(
            [
                {
                    "concept": r["concept"],
                    "base acc": interval_text(r, "base_target_acc"),
                    **{
                        f"{s} {m.replace('_', ' ')}": interval_text(
                            r, f"{s}_{m}", 1 + ("ppl" not in m)
                        )
                        for s in states
                        for m in metrics
                    },
                    **{
                        f"range−neuron {m.replace('_', ' ')}": interval_text(
                            r, f"diff_range_neuron_{m}", 1 + ("ppl" not in m)
                        )
                        for m in metrics
                        if f"diff_range_neuron_{m}" in r
                    },
                }
                for r in rows
            ]
        )
        sweep = pd.DataFrame(
            [
                {
                    "tau": r["tau"],
                    **{
                        f"{s} {m.replace('_', ' ')}": interval_text(
                            r, f"{s}_{m}", 1 + ("ppl" not in m)
                        )
                        for s in states
                        for m in metrics
                        if f"{s}_{m}" in r
                    },
                }
                for r in info.get("sweep", [])
            ]
        )
        erased: list[dict[str, Any]] = []
        if self.run.ranges is not None:
            rm = self.run.ranges.range_map
            for c, name in enumerate(rm.concepts):
                ranges = [
                    (int(j), float(rm.lo[c, r]), float(rm.hi[c, r]))
                    for r, j in enumerate(rm.neurons[c, :12])
                ]
                erased.append({"concept": name, "k": rm.neurons.shape[1], "ranges": ranges})
        return {
            "erasure": erasure,
            "config": summary.get("config", {}),
            "info": info,
            "headline": _table(headline, grouped=False),
            "sweep": _table(sweep, grouped=False),
            "erased": erased,
            "rows": self.run.ranges.range_map.metadata.get("rows") if self.run.ranges else None,
            "table": _table(erasure.table, grouped=False) if erasure.table is not None else None,
        }

    def _explanation_table(self, figs: dict[str, str]) -> dict[str, Any]:
        found = self.run.explanations
        pages = [p for p in self.neurons if p.explanation is not None]
        n_better = sum(
            p.explanation.iterative.held_out > p.explanation.single_pass.held_out
            for p in pages
            if p.explanation is not None
        )
        return {"explained": found, "pages": pages, "figs": figs, "n_better": n_better}

    # --------------------------------------------------------------------------- neuron pages

    def _text_exemplars(self) -> dict[int, dict[str, list[dict[str, Any]]]]:
        """Per neuron page with stats, the texts with the highest and lowest pooled activation."""
        run = self.run
        if run.texts is None or run.capture is None or run.capture.features is None:
            return {}
        ids = np.array([p.neuron for p in self.neurons if p.at_site], dtype=np.int64)
        if ids.size == 0:
            return {}
        values = run.capture.features[:, ids]
        order = np.argsort(values, axis=0)
        k = min(N_TEXT_EXEMPLARS, len(values))
        out = {}
        for col, j in enumerate(ids.tolist()):
            out[j] = {
                "highest": [
                    self._text(int(i), j, float(values[i, col])) for i in order[::-1][:k, col]
                ],
                "lowest": [self._text(int(i), j, float(values[i, col])) for i in order[:k, col]],
            }
        return out

    def _text(self, i: int, neuron: int, value: float) -> dict[str, Any]:
        run = self.run
        assert run.texts is not None
        text = " ".join(run.texts.texts[i].split())
        label = int(run.texts.labels[i])
        inside = [
            c
            for c in range(len(self.concepts))
            if (c, neuron) in self.rows
            and any(lo <= value <= hi for lo, hi in self.rows[c, neuron]["intervals"])
        ]
        return {
            "concept": label,
            "value": value,
            "snippet": text[:SNIPPET_CHARS] + ("…" if len(text) > SNIPPET_CHARS else ""),
            "split": "train" if i in self.train else "test",
            "in_range": inside,
        }

    def _neuron_detail(
        self, page: _Neuron, texts: dict[str, list[dict[str, Any]]]
    ) -> dict[str, Any]:
        detail: dict[str, Any] = {"svg": None, "stats": [], "texts": texts, "records": {}}
        moments = self.moments
        if page.at_site and moments is not None:
            j = page.neuron
            series, table = [], []
            for c, name in enumerate(self.concepts):
                row = self.rows.get((c, j))
                band = row["intervals"] if row else None
                mean, std = float(moments["mean"][c, j]), float(moments["std"][c, j])
                series.append(
                    figures.Series(name, c, moments["hist_counts"][c, j], mean, std, band)
                )
                table.append(
                    {"index": c, "row": row, **{k: moments[k][c, j].item() for k in _MOMENTS}}
                )
            detail["svg"] = figures.histogram_svg(moments["edges"][j], series)
            detail["stats"] = table
        if page.record is not None:
            detail["records"] = _token_views(page.record)
        return detail


_MOMENTS = ("count", "mean", "std", "min", "max", "skew")


def _moments(run: RunContents) -> dict[str, np.ndarray] | None:
    """Per-(concept, neuron) statistics, histogram counts ``(C, d, n_bins)`` and bin edges
    ``(d, n_bins + 1)``, computed once for all neuron pages."""
    if run.capture is None:
        return None
    stats = run.capture.stats
    state = stats.state_dict()
    offsets = state["hist_start"][:, None] + np.arange(stats.n_bins + 1)
    out = {name: np.asarray(getattr(stats, name)) for name in _MOMENTS}
    out["count"] = np.broadcast_to(out["count"][:, None], out["mean"].shape)
    out["hist_counts"] = state["hist_counts"]
    out["edges"] = np.ldexp(offsets.astype(np.float64), state["hist_exp"][:, None])
    return out


def _token_views(record: NeuronRecord) -> dict[str, list[list[dict[str, Any]]]]:
    """Exemplars as token lists with a heat level (sign and magnitude relative to the largest
    absolute activation shown) for highlighting."""
    top, quantiles = record.top[:N_TOP_EXEMPLARS], record.quantiles[:N_QUANTILE_EXEMPLARS]
    scale = max((abs(a) for r in (*top, *quantiles) for a in r.activations), default=0.0) or 1.0

    def view(r: ActivationRecord) -> list[dict[str, Any]]:
        peak = r.peak
        return [
            {
                "text": tok,
                "value": a,
                "heat": f"{'p' if a >= 0 else 'n'}{round(HEAT_LEVELS * abs(a) / scale)}",
                "peak": k == peak,
            }
            for k, (tok, a) in enumerate(zip(r.tokens, r.activations, strict=True))
        ]

    return {"top": [view(r) for r in top], "quantiles": [view(r) for r in quantiles]}


def _table(frame: pd.DataFrame, *, grouped: bool = True) -> dict[str, Any] | None:
    """A table for the ``data_table`` macro; ``grouped``: columns ``base_*``, ``range_*`` and
    ``neuron_*`` go under a header row naming their state."""
    if frame.empty:
        return None
    groups: list[list[Any]] = []
    labels = []
    for col in frame.columns:
        head, _, rest = str(col).partition("_")
        group = head if grouped and head in ("base", "range", "neuron") and rest else ""
        if groups and groups[-1][0] == group:
            groups[-1][1] += 1
        else:
            groups.append([group, 1])
        labels.append((rest if group else str(col)).replace("_", " "))
    return {
        "groups": groups,
        "labels": labels,
        "numeric": [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns],
        "rows": frame.to_dict(orient="split")["data"],
    }


def _palette_css(n_concepts: int) -> str:
    """Concept colour classes ``.c0``, ``.c1``, ... (shared with the SVG and matplotlib figures)."""
    return "".join(f".c{c}{{--concept:{figures.color(c)}}}\n" for c in range(max(n_concepts, 1)))

"""The pages of the atlas: one renderer (:class:`Site`) that writes every page of a run from the
Jinja templates, with the figures it embeds.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from rangelens.erasure.outputs import methods_for
from rangelens.explain.loop import NeuronExplanation
from rangelens.explain.records import NeuronRecord
from rangelens.ranges.fit import overlap_statement
from rangelens.report import figures
from rangelens.report.contents import (
    RunContents,
    concepts_per_neuron,
    distribution_overlap,
    salient_overlap,
)
from rangelens.report.views import (
    MOMENTS,
    concept_moments,
    erasure_context,
    mode_views,
    palette_css,
    token_views,
)

PACKAGE_DIR = Path(__file__).parent
N_TEXT_EXEMPLARS = 4
SNIPPET_CHARS = 320


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


class Site:
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
        self.moments = concept_moments(run)
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
        (self.out / "static" / "palette.css").write_text(palette_css(len(self.concepts)))
        figs = self._figures()
        common = {"run": self.run, "concepts": self.concepts, "sections": self.sections}
        pages = {
            "index.html": ("overview.html", self._overview(figs)),
            "concepts.html": ("concepts.html", self._concept_pages(figs)),
            "neurons.html": ("neurons.html", self._neurontable_context()),
            "erasure.html": ("erasure.html", erasure_context(self.run)),
            "explanations.html": ("explanations.html", self._explanationtable_context(figs)),
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

    def _neurontable_context(self) -> dict[str, Any]:
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

    def _explanationtable_context(self, figs: dict[str, str]) -> dict[str, Any]:
        found = self.run.explanations
        pages = [p for p in self.neurons if p.explanation is not None]
        n_better = sum(
            p.explanation.iterative.held_out > p.explanation.single_pass.held_out
            for p in pages
            if p.explanation is not None
        )
        modes = {
            p.neuron: mode_views(p.explanation, p.record)
            for p in pages
            if p.explanation is not None
        }
        n_modes = sum(len(v) for v in modes.values())
        n_mixed = sum(v["mode"].label.startswith("mixed") for vs in modes.values() for v in vs)
        return {
            "explained": found,
            "pages": pages,
            "figs": figs,
            "n_better": n_better,
            "modes": modes,
            "n_modes": n_modes,
            "n_mixed": n_mixed,
        }

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
                    {"index": c, "row": row, **{k: moments[k][c, j].item() for k in MOMENTS}}
                )
            detail["svg"] = figures.histogram_svg(moments["edges"][j], series)
            detail["stats"] = table
        if page.record is not None:
            detail["records"] = token_views(page.record)
        side = self.run.output_side
        detail["output"] = side.of(page.neuron) if side is not None and page.at_site else None
        detail["output_note"] = side.note if side is not None else None
        detail["shift"] = side.shift_of(page.neuron) if side is not None and page.at_site else None
        detail["shift_about"] = side.shift_about if side is not None else {}
        shift = detail["shift"]
        detail["shift_concept"] = self.concepts.index(shift.concept) if shift else None
        detail["shift_band"] = figures.band_text(shift.band) if shift else None
        detail["shift_note"] = None
        if side is not None and detail["shift"] is None and side.note is None:
            detail["shift_note"] = side.shift_note or (
                side.shift_skipped
                if page.concepts
                else "the neuron is not salient for any concept: no range to mask"
            )
        return detail

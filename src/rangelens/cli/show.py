"""What the CLI prints: stage decisions, the analysis summary, the erasure headline and verdict,
the explanations table and the LLM summary. Tables never cut a name: they wrap, and when output is
not a terminal they are laid out wide enough to fit.
"""

from __future__ import annotations

import sys
import unicodedata
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Not a terminal (a file, a pipe, a test): no 80-column cut.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def terminal_text(value: object) -> str:
    """User text (a label) for a terminal table: control, bidirectional-formatting and other
    invisible format characters shown escaped (U+202E as ``\\u202e``, a tab as ``\\t``) so they
    cannot reorder or break the line, and ``[`` escaped so it is not read as rich markup. Zero-width
    joiners (emoji sequences) are kept."""
    text = "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch not in "\u200c\u200d"
        else ch
        for ch in str(value)
    )
    return escape(text)


def stage_line(event: Any) -> None:
    """One line per stage as it starts: reused, or running and why."""
    if event.action == "ran":  # already announced as running
        return
    colour = "dim" if event.action == "reused" else "cyan"
    err_console.print(f"[{colour}]{event}[/]", highlight=False, soft_wrap=True)


def print_analysis(result: Any) -> None:
    """Readable summary of an analysis run."""
    info = result.capture.info
    console.print(
        f"[bold]captured[/] {info['site']} ({info['module']}) at position "
        f"'{result.range_map.metadata.get('position')}': {info['n_texts']} texts, "
        f"{info['n_tokens']} tokens, {info['tokens_per_second']} tokens/s, "
        f"peak RSS {info['peak_rss_mb']} MB"
    )
    table = Table(title="concept ranges")
    for col in ("concept", "train n", "salient", "shared", "skew", "ex. kurt", "BC max", "purity"):
        table.add_column(col, justify="right" if col != "concept" else "left")
    counts = dict(zip(result.capture.label_names, result.capture.stats.count, strict=True))
    poly = dict(
        zip(result.polysemanticity["concept"], result.polysemanticity["shared"], strict=True)
    )
    for row in result.summary.to_dict(orient="records"):
        name = row["concept"]
        table.add_row(
            terminal_text(name),
            str(int(counts[name])) if name in counts else str(int(sum(counts.values()))),
            str(int(row["n_neurons"])),
            f"{poly.get(name, sum(poly.values()) / len(poly)):.0%}",
            f"{row['median_skew']:+.2f}",
            f"{row['median_excess_kurtosis']:+.2f}",
            f"{row['median_bhattacharyya_max']:.2f}",
            f"{row['median_purity']:.2f}",
        )
    console.print(table)
    console.print(
        "[dim]shared: share of the concept's salient neurons also salient for another concept; "
        "skew/ex. kurt: medians (0 for a Gaussian); BC max: median largest Bhattacharyya "
        "overlap with another concept; purity: median share of in-range activations from the "
        "concept[/]"
    )
    from rangelens.ranges.fit import overlap_statement

    console.print(
        f"ranges fitted on: {result.range_map.metadata.get('rows', 'all training rows')}, "
        f"ranking '{result.range_map.metadata.get('ranking')}'"
    )
    console.print(
        f"[bold]{overlap_statement(result.summary, len(result.capture.label_names))}[/]",
        highlight=False,
    )
    console.print(f"[bold green]run directory:[/] {result.run_dir}")


def print_erasure(result: Any) -> None:
    """The erasure headline with 95% intervals, the random-neuron control, warnings and the
    verdict."""
    from rangelens.erasure.outputs import interval_text

    info = result.info
    states = list(info.get("conditions", ["range", "neuron"]))
    frame = result.headline.set_index("concept")
    average = frame.loc["average"].to_dict()
    protocol = info.get("protocol", {})
    table = Table(
        title=f"erasure, average over concepts ({info.get('n_test_texts', '?')} test texts, "
        f"{protocol.get('folds', '?')}-fold x {protocol.get('repeats', 1)})"
    )
    table.add_column("effect vs base (95% CI)")
    for state in states:
        table.add_column(state, justify="right")
    diff = "diff_range_neuron_target_drop" in average
    if diff:
        table.add_column("range − neuron", justify="right")
    metrics = [
        ("target accuracy drop (frozen head)", "target_drop", 2),
        ("target recall, retrained linear probe", "linear_probe_recall", 2),
        ("balanced acc, retrained linear probe", "linear_probe_balanced", 2),
        ("balanced acc, concept-vs-rest linear probe", "binary_probe_balanced", 2),
        ("target recall, retrained MLP probe", "mlp_probe_recall", 2),
        ("balanced acc, retrained MLP probe", "mlp_probe_balanced", 2),
        ("complement accuracy drop", "complement_drop", 2),
        ("complement flip rate", "complement_flip", 2),
        ("perplexity change", "ppl_change", 1),
        ("edit norm (masked site)", "edit_norm", 2),
    ]
    for title, key, digits in metrics:
        cells = [interval_text(average, f"{s}_{key}", digits) for s in states]
        if all(c == "–" for c in cells):
            continue  # not measured here (perplexity of an encoder, probes off)
        if diff:
            cells.append(interval_text(average, f"diff_range_neuron_{key}", digits))
        table.add_row(title, *cells)
    console.print(table)
    per = Table(title="per concept (points; intervals in erasure/headline.md)")
    per.add_column("concept", overflow="fold")
    per.add_column("texts", justify="right")
    per.add_column("base acc", justify="right")
    short = {"range": "R", "neuron": "N", "random": "X"}
    for key in ("drop", "flip"):
        for state in states:
            per.add_column(f"{key} {short.get(state, state)}", justify="right")
    for name, row in frame.iterrows():
        cells = [terminal_text(name), str(int(row["n_target"])), f"{row['base_target_acc']:.2f}"]
        for key in ("target_drop", "complement_flip"):
            cells += [f"{row[f'{s}_{key}']:+.2f}" for s in states]
        per.add_row(*cells)
    console.print(per)
    base_ppl = info.get("base_ppl")
    ppl = (
        f"; perplexity change is masked - base on general text (base {base_ppl:.1f})"
        if isinstance(base_ppl, float) and base_ppl == base_ppl
        else ""
    )
    console.print(
        "[dim]Drops are base - masked accuracy of the frozen head (erasure wants a large target "
        "drop and ~0 collateral); retrained probes are refit on the masked training rows (does "
        "the concept stay decodable?); flip: share of other-concept texts whose prediction "
        f"changed{ppl}. R / range: range mask; N / neuron: neuron mask; X / random: as many "
        "random neurons masked (control). Per concept, drop is the target accuracy drop.[/]"
    )
    for notice in info.get("notices", []):
        console.print(f"[bold]notice:[/] {notice}", highlight=False, soft_wrap=True)
    for warning in info.get("warnings", []):
        err_console.print(f"[bold red]WARNING:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"[bold]Verdict.[/] {info.get('verdict', '')}", highlight=False)


def _short(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _auc(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def print_explanations(explained: Any, where: Any) -> None:
    """One row per mode: the neuron, the mode's range, its label (what its words share, with the
    concept share of its exemplars), its strongest context (peak token in brackets) and, on each
    neuron's first row, the held-out scores: r (iterative / single pass / lookup reference) from
    the simulator and the semantic judge's AUC for its own explanation vs another neuron's."""
    from rangelens.explain.results import mode_contexts

    results = list(explained.explanations.values())
    meta = explained.metadata
    judges = ", ".join(meta.get("judges", [])) or "–"
    table = Table(
        title=f"explanations of {meta.get('site')} ({meta.get('backend')}; simulator "
        f"{meta.get('simulator', '?')}; judges {judges}) -> {where}"
    )
    cols = (
        "neuron",
        "mode",
        "range",
        "label: words",
        "top context",
        "r: iterative / single-pass / lookup",
        "semantic AUC vs mismatched",
    )
    for col in cols:
        table.add_column(col, overflow="fold")
    for e in results:
        record = explained.records.get(e.neuron)
        for k, m in enumerate(e.modes or [None]):
            first = k == 0
            scores = f"{e.iterative.held_out:.2f} / {e.single_pass.held_out:.2f} / " + (
                f"{e.lookup.held_out:.2f}" if e.lookup is not None else "–"
            )
            semantic = (
                f"{_auc(e.iterative.semantic_auc)} vs {_auc(e.iterative.semantic_mismatched)}"
                if e.iterative.semantic_failure is None
                else terminal_text(e.iterative.semantic_failure)
            )
            if m is None:
                table.add_row(str(e.neuron), "–", "–", "no explanation", "", scores, semantic)
                continue
            rng = f"[{m.lo:.2f}, {m.hi:.2f}]" if m.lo is not None and m.hi is not None else "none"
            ctx = mode_contexts(m, record, n=1) if record is not None else []
            table.add_row(
                str(e.neuron) if first else "",
                str(k + 1),
                rng,
                terminal_text(_short(m.explanation or m.label)),
                terminal_text(ctx[0].text()) if ctx else "",
                scores if first else "",
                semantic if first else "",
            )
    console.print(table)
    modes = [m for e in results for m in e.modes]
    mixed = sum(m.label.startswith("mixed") for m in modes)
    console.print(
        f"[dim]{len(modes)} modes, {mixed} labelled mixed (nothing shared). r: held-out "
        "correlation of the simulation (the lookup table is a per-token reference ceiling, not a "
        "competitor); semantic AUC: the embedding judge on held-out texts, own explanation vs "
        "another neuron's (the floor, ~0.5 or below).[/]",
        highlight=False,
    )


def report_llm(llm: Any, max_failed: float = 0.5) -> None:
    """Print the LLM failure summary; exit 1 when more than ``max_failed`` of the steps failed."""
    stats = llm.stats
    err_console.print(stats.summary(), highlight=False, soft_wrap=True)
    if stats.steps and stats.failed_steps > max_failed * stats.steps:
        err_console.print(
            f"[bold red]error:[/] {stats.failed_steps} of {stats.steps} LLM steps failed; the "
            "explanations are not trustworthy (check the server, --llm-model, --timeout, "
            "--max-attempts)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


STEER_LABELS = {
    "base": "base (unsteered)",
    "range": "range steering (salient neurons set inside the concept's ranges)",
    "direction": "mean-difference steering (baseline)",
}


def print_steering(frame: Any, concept: str) -> None:
    """Base vs steered continuations, one block per prompt."""
    for prompt, rows in frame.groupby("prompt", sort=False):
        console.print(f"[bold]prompt:[/] {terminal_text(prompt)}", highlight=False, soft_wrap=True)
        for row in rows.itertuples():
            label = STEER_LABELS.get(str(row.method), str(row.method))
            if row.method != "base":
                label += f", toward {terminal_text(concept)}"
            console.print(f"[cyan]{label}:[/]", highlight=False)
            console.print(f"  {terminal_text(row.text)}", highlight=False, soft_wrap=True)

"""Demo stage times of two rangelens source trees, side by side in one run.

Each demo (``rangelens demo``: the packaged smollm2-135m config, atlas included) runs in its own
process with ``PYTHONPATH`` set to one tree's ``src``, alternating the trees (old, new, old, new,
...), one at a time. The seconds of each stage are the time between the runner reporting it
running and done (the model load falls in the first stage that needs the model: capture).
Writes the table into ``RESULTS.md`` between its ``demo-stages`` markers, leaving the rest as is::

    git -C /work/main worktree add /tmp/demo_old 47cf251
    python benchmarks/demo_stages.py /tmp/demo_old/src src --rounds 2 --runs /tmp/demo-runs
    python benchmarks/compare_runs.py /tmp/demo-runs/old-0 /tmp/demo-runs/new-0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("capture", "splits", "ranges", "erasure", "explanations", "atlas")
BEGIN, END = "<!-- demo-stages:begin -->", "<!-- demo-stages:end -->"


def child(out: Path) -> None:
    """One demo into ``out``; prints the stage seconds as JSON (last line)."""
    from rangelens.config.run import example_config, load_config
    from rangelens.pipeline import run

    config = load_config(example_config("smollm2-135m")).model_copy(update={"out": out})
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def report(event: object) -> None:
        stage, action = getattr(event, "stage"), getattr(event, "action")  # noqa: B009
        if action == "running":
            started[stage] = time.perf_counter()
        elif action == "ran":
            seconds[stage] = time.perf_counter() - started[stage]

    start = time.perf_counter()
    run(config, progress=False, report=report, atlas=True)
    seconds["total"] = time.perf_counter() - start
    print(json.dumps(seconds))


def one(src: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def compared(runs: Path) -> str:
    """The verdict of ``compare_runs.py`` on the first old and new runs (by content)."""
    done = subprocess.run(
        [sys.executable, str(HERE / "compare_runs.py"), str(runs / "old-0"), str(runs / "new-0")],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip().splitlines()[-1]


def block(results: dict[str, list[dict[str, float]]], old: str, new: str, verdict: str) -> str:
    rows = []
    for stage in (*STAGES, "total"):
        o = [r.get(stage, 0.0) for r in results["old"]]
        n = [r.get(stage, 0.0) for r in results["new"]]
        ratio = f"{sum(o) / sum(n):.2f}x" if sum(n) > 0 else "-"
        rows.append(
            f"| {stage} | {' / '.join(f'{x:.1f}' for x in o)} | "
            f"{' / '.join(f'{x:.1f}' for x in n)} | {ratio} |"
        )
    return "\n".join(
        [
            BEGIN,
            "## Demo stage times, before and after one forward pass per text",
            "",
            f"`python benchmarks/demo_stages.py {old} {new} --rounds "
            f"{len(results['old'])}`: `rangelens demo` (smollm2-135m, bbc-news 100 texts per "
            "class, 64 tokens, last-block resid, 5-fold erasure, 6 neurons explained, atlas), "
            "one process per demo, old and new alternating, one at a time. Seconds per run, in "
            "run order; the ratio is old / new summed over the runs.",
            "",
            "| stage | old (s) | new (s) | old / new |",
            "|---|---|---|---|",
            *rows,
            "",
            f"`benchmarks/compare_runs.py` on the first old and new run: **{verdict}** (erasure "
            "figures, every range map, every explanation).",
            END,
        ]
    )


def write_block(path: Path, text: str) -> None:
    """Replace the marked block of ``path`` (or append it), keeping everything else."""
    current = path.read_text() if path.exists() else ""
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        current = head + text + rest.split(END, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("old", type=Path, nargs="?", help="src folder of the old tree")
    parser.add_argument("new", type=Path, nargs="?", help="src folder of the new tree")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/demo-runs"))
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, src in (("old", args.old), ("new", args.new)):
            results[name].append(one(src, args.runs / f"{name}-{r}"))
            print(name, r, json.dumps(results[name][-1]), flush=True)
    (args.runs / "stages.json").write_text(json.dumps(results, indent=1))
    verdict = compared(args.runs)
    write_block(args.results, block(results, str(args.old), str(args.new), verdict))


if __name__ == "__main__":
    main()

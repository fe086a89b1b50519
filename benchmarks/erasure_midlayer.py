"""The mid-layer erasure setting with the default head, old vs new, side by side (issue 19).

smollm2-135m on bbc-news (80 texts per class), the demo's erasure config (range / neuron / density
/ LEACE / random, the τ sweep, perplexity at every τ), masks at ``mlp`` layer 15 and the default
head (the last block's resid): every masked condition re-runs blocks 15..29. OLD: one suffix
forward per mask (``stack_rows = 1``, the engine as it was); NEW: the masks stacked into batched
suffix forwards (``stack_rows``, default the config's). Both evaluate exactly the masks the erasure
stage builds (``experiment._groups``, every fold and the perplexity set).

The whole stage needs over an hour per path on a 2-core CPU, so the timed part is a subset, and the
full-stage figures are extrapolated from it (said so in the output): the first ``--masks`` masks of
fold 0 on its first test batch (classification) and on the first batch of general text
(perplexity), old and new interleaved ``--reps`` times. Forward counts are exact for the whole
stage. The outputs of both paths are compared. Prints a markdown section::

    python benchmarks/erasure_midlayer.py --work /tmp/erasure-midlayer > /tmp/midlayer.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rangelens.activations.capture import tokenize
from rangelens.config.run import example_config, load_config
from rangelens.data import general_text
from rangelens.erasure import experiment
from rangelens.erasure.engine import Group, masks_per_forward, run_groups, starts_for
from rangelens.erasure.information import site_features
from rangelens.erasure.tasks import token_nll
from rangelens.pipeline.runner import Runner
from rangelens.pipeline.stages import Inputs, capture_stage, ranges_stage, splits_stage
from rangelens.ranges.splits import FULL
from rangelens.rundir import RunDir


def prepared(work: Path) -> dict[str, Any]:
    """Capture, splits and ranges of the setting (reused from ``work`` when already there), and
    every mask the erasure stage evaluates by forwards: per fold (classification) and for
    perplexity."""
    config = load_config(example_config("smollm2-135m"))
    analysis = config.analysis.model_copy(update={"site": "mlp", "layer": 15, "max_per_class": 80})
    a = analysis.resolved()
    e = config.erasure
    assert e is not None
    run_dir = RunDir(work)
    inputs = Inputs(run_dir, a, e, progress=False)
    runner = Runner(run_dir, before_write=lambda: run_dir.write_meta(a.model_dump(), a.seed))
    cap = runner(capture_stage(inputs, progress=False))
    splits = runner(splits_stage(inputs, cap))
    ranges = runner(ranges_stage(inputs, cap, splits)).rangeset
    lm, data, protocol = inputs.lm, inputs.data, inputs.protocol
    sites = experiment._sites(lm, a, ranges)
    task = protocol.task(cap)
    folds = [s for s in ranges.splits.values() if s.name != FULL]
    found = site_features(protocol.classifier(cap, folds[0]), cap, sites[0], a.position)
    features = {sites[0].name: found[0]} if found is not None else {}
    classify = []
    for split in folds:
        groups = experiment._groups(
            ranges, sites, split.name, protocol.concepts, e, a, None, features, data.labels
        )
        rows = np.setdiff1d(split.test, task.reserved)
        classify.append(
            {
                "groups": groups,
                "texts": [task.inputs[i] for i in rows],
                "readout": protocol.classifier(cap, split).readout,
                "starts": starts_for(lm, groups, task.sites, e.suffix),
            }
        )
    at = None if e.ppl_sweep else [(float(a.tau), float(a.p))]
    ppl = experiment._groups(
        ranges, sites, FULL, protocol.concepts, e, a, at, features, data.labels
    )
    return {
        "lm": lm,
        "analysis": a,
        "erasure": e,
        "task": task,
        "classify": classify,
        "ppl": {
            "groups": ppl,
            "texts": general_text(e.ppl_texts, seed=a.seed),
            "starts": starts_for(lm, ppl, [], e.suffix),
        },
    }


def count(lm: Any, texts: list[str], groups: list[Group], stack_rows: int, **tok: Any) -> int:
    """Suffix forwards :func:`run_groups` makes for ``groups`` over ``texts``."""
    return sum(
        -(-len(g.masks) // masks_per_forward(stack_rows, len(batch.index)))
        for batch in tokenize(lm, texts, **tok)
        for g in groups
    )


def timed(
    lm: Any, texts: list[str], group: Group, forward: Any, start: int, stack_rows: int, **tok: Any
) -> tuple[float, dict[Any, Any]]:
    bar = tqdm(total=0, disable=True)
    clock = time.perf_counter()
    with torch.inference_mode():
        out = run_groups(
            lm, texts, [group], forward, [start], bar=bar, stack_rows=stack_rows, **tok
        )
    return time.perf_counter() - clock, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/erasure-midlayer"))
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per path")
    parser.add_argument("--masks", type=int, default=8, help="masks in the timed subset")
    parser.add_argument("--stack-rows", type=int, default=None, help="new path (default: config)")
    args = parser.parse_args()
    clock = time.perf_counter()
    load = os.getloadavg()[0]
    s = prepared(args.work)
    setup = time.perf_counter() - clock
    lm, a, e, task = s["lm"], s["analysis"], s["erasure"], s["task"]
    new_rows = args.stack_rows or e.stack_rows
    b = a.batch_size
    cls_tok = {"batch_size": b, "max_length": task.max_length, "padding_side": task.padding_side}
    ppl_tok = {"batch_size": b, "max_length": e.ppl_max_length, "padding_side": None}

    # Exact counts for the whole stage: mask x batch evaluations, and forwards per path.
    evaluations = {"classify": 0, "perplexity": 0}
    forwards: dict[str, dict[str, int]] = {"old": {}, "new": {}}
    parts = [("classify", f, cls_tok) for f in s["classify"]] + [("perplexity", s["ppl"], ppl_tok)]
    for name, part, tok in parts:
        evaluations[name] += count(lm, part["texts"], part["groups"], 1, **tok)
        for path, rows in (("old", 1), ("new", new_rows)):
            n = count(lm, part["texts"], part["groups"], rows, **tok)
            forwards[path][name] = forwards[path].get(name, 0) + n

    # The timed subset: the first masks of fold 0 / of the perplexity set, one batch each.
    subsets = {}
    for name, part, tok in [parts[0], parts[-1]]:
        first = tokenize(lm, part["texts"], **tok)[0]
        texts = [part["texts"][i] for i in first.index]
        group = part["groups"][0]
        keys = list(group.masks)[: args.masks]
        forward = part.get("readout") or partial(token_nll, lm.model)
        subset = Group(group.site, {k: group.masks[k] for k in keys})
        subsets[name] = (texts, subset, forward, part["starts"][0], tok)
    seconds: dict[str, dict[str, list[float]]] = {
        n: {"old": [], "new": []} for n in ("classify", "perplexity")
    }
    outputs: dict[str, dict[str, Any]] = {n: {} for n in seconds}
    for rows in (1, new_rows):  # warm-up, untimed: first calls allocate
        for texts, group, forward, start, tok in subsets.values():
            timed(lm, texts, group, forward, start, rows, **tok)
    rep_loads = []
    for _ in range(args.reps):
        rep_loads.append(os.getloadavg()[0])
        for path, rows in (("old", 1), ("new", new_rows)):
            for name, (texts, group, forward, start, tok) in subsets.items():
                t, out = timed(lm, texts, group, forward, start, rows, **tok)
                seconds[name][path].append(t)
                outputs[name][path] = out

    # The fixed cost of one suffix forward (hooks, Python, mask building in the stock forward):
    # the same masks, one forward each, on a one-text batch ("Hi there").
    texts, group, forward, start, tok = subsets["classify"]
    tiny = timed(lm, ["Hi there"], group, forward, start, 1, **tok)[0]
    overhead = timed(lm, ["Hi there"], group, forward, start, 1, **tok)[0] / len(group.masks)
    overhead = min(overhead, tiny / len(group.masks))

    agree = {}
    for name, by_path in outputs.items():
        diffs, same_pred = [], True
        for key, pairs in by_path["old"].items():
            old, new = pairs[0][1], by_path["new"][key][0][1]
            if name == "classify":
                o, n = old.cpu().numpy(), new.cpu().numpy()
                same_pred &= bool((o.argmax(1) == n.argmax(1)).all())
            else:
                o, n = old[0], new[0]  # summed NLL per text
                same_pred &= bool(np.array_equal(old[1], new[1]))
            diffs.append(float(np.max(np.abs(o - n) / np.maximum(np.abs(o), 1e-12))))
        agree[name] = {"max_rel_diff": max(diffs), "same": same_pred, "masks": len(diffs)}

    loads = (load, *rep_loads, os.getloadavg()[0])
    report(args, s, setup, new_rows, evaluations, forwards, seconds, agree, overhead, loads)


def report(
    args: argparse.Namespace,
    s: dict[str, Any],
    setup: float,
    new_rows: int,
    evaluations: dict[str, int],
    forwards: dict[str, dict[str, int]],
    seconds: dict[str, dict[str, list[float]]],
    agree: dict[str, dict[str, Any]],
    overhead: float,
    loads: tuple[float, ...],
) -> None:
    a = s["analysis"]
    k = masks_per_forward(new_rows, a.batch_size)
    n_masks = {
        "classify": [len(f["groups"][0].masks) for f in s["classify"]],
        "perplexity": [len(s["ppl"]["groups"][0].masks)],
    }
    lines = [
        "## Mid-layer setting, default head: one suffix forward per mask vs stacked masks\n",
        f"smollm2-135m, bbc-news 80 texts per class (400 texts, 5 folds), the demo's erasure "
        f"config, masks at mlp.15, head on resid.29 (default), batch {a.batch_size}: every "
        f"masked condition re-runs blocks 15..29. Masks per fold (base included): "
        f"{n_masks['classify']}; for perplexity: {n_masks['perplexity'][0]}. OLD: one forward "
        f"per mask (`stack_rows 1`); NEW: `stack_rows {new_rows}` = {k} masks × "
        f"{a.batch_size} texts per forward. Setup (capture, ranges, head features, LEACE fits; "
        f"untimed): {setup:.0f} s. One untimed warm-up of each path, then {args.reps} interleaved "
        f"repetitions (old, new, old, new, …) "
        f"on a 2-core CPU shared with other jobs.\n",
        "| part | mask×batch evaluations (whole stage) | suffix forwards OLD | suffix forwards NEW |",
        "|:---|---:|---:|---:|",
    ]
    for name in ("classify", "perplexity"):
        lines.append(
            f"| {name} | {evaluations[name]} | {forwards['old'][name]} | {forwards['new'][name]} |"
        )
    total_old, total_new = sum(forwards["old"].values()), sum(forwards["new"].values())
    lines.append(f"| total | {sum(evaluations.values())} | {total_old} | {total_new} |\n")
    lines += [
        f"Timed subset: the first {args.masks} masks on one batch of {a.batch_size} texts "
        f"(classification: fold 0's first test batch; perplexity: the first general-text batch).\n",
        "| part | OLD s (each rep) | NEW s (each rep) | OLD / NEW per rep | s per mask×batch OLD | "
        "s per mask×batch NEW | outputs agree |",
        "|:---|:---|:---|:---|---:|---:|:---|",
    ]
    full = {"old": 0.0, "new": 0.0}
    for name, by_path in seconds.items():
        ratios = [o / n for o, n in zip(by_path["old"], by_path["new"], strict=True)]
        per = {p: statistics.median(v) / args.masks for p, v in by_path.items()}
        for p in full:
            full[p] += per[p] * evaluations[name]
        g = agree[name]
        what = "same predicted class" if name == "classify" else "same token counts"
        lines.append(
            f"| {name} | {', '.join(f'{x:.1f}' for x in by_path['old'])} | "
            f"{', '.join(f'{x:.1f}' for x in by_path['new'])} | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} | {per['old']:.3f} | {per['new']:.3f} | "
            f"{what}: {g['same']}; max relative difference {g['max_rel_diff']:.1e} over "
            f"{g['masks']} masks |"
        )
    old_all = [sum(seconds[n]["old"][i] for n in seconds) for i in range(args.reps)]
    new_all = [sum(seconds[n]["new"][i] for n in seconds) for i in range(args.reps)]
    ratios = [o / n for o, n in zip(old_all, new_all, strict=True)]
    lines += [
        "",
        f"Subset, both parts: OLD {', '.join(f'{x:.1f}' for x in old_all)} s, NEW "
        f"{', '.join(f'{x:.1f}' for x in new_all)} s; ratio OLD / NEW per repetition "
        f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}, range "
        f"{min(ratios):.2f}–{max(ratios):.2f}); 1-minute load average at each repetition's start "
        f"{', '.join(f'{x:.1f}' for x in loads[1:-1])} ({os.cpu_count()} cores).",
        f"Whole stage's forwards, EXTRAPOLATED from the subset's median seconds per mask×batch "
        f"(not run): OLD ≈ {full['old'] / 60:.0f} min, NEW ≈ {full['new'] / 60:.0f} min "
        f"(plus probes, LEACE fits and bootstrap, the same in both).",
        "",
        "Floor arithmetic (forwards needed × seconds per forward, medians of the subset; the "
        "subset's one prefix run is charged to its forwards, which flatters OLD slightly):",
    ]
    for name in ("classify", "perplexity"):
        per_old = statistics.median(seconds[name]["old"]) / args.masks
        per_new = statistics.median(seconds[name]["new"]) / -(-args.masks // k)
        lines.append(
            f"- {name}: OLD {forwards['old'][name]} × {per_old:.2f} s ≈ "
            f"{forwards['old'][name] * per_old / 60:.0f} min; NEW {forwards['new'][name]} × "
            f"{per_new:.2f} s ≈ {forwards['new'][name] * per_new / 60:.0f} min. A forward of {k} "
            f"masks × {a.batch_size} texts cost {per_new / per_old:.2f}× one of {a.batch_size} "
            f"texts (it holds {k}× the rows)."
        )
    need = total_old / (3 * total_new)
    lines += [
        "",
        f"Stacking cuts the forwards {total_old / total_new:.2f}×, so 3× needs a stacked forward to "
        f"cost at most {need:.2f}× an unstacked one. The compute grows with the rows; what stacking "
        f"removes is the fixed cost per forward and per operation (a suffix forward of one short "
        f'text, "Hi there", took {overhead * 1000:.0f} ms here), which a CPU shared by other '
        f"jobs inflates (load average {loads[0]:.1f} at the start, {loads[-1]:.1f} at the end, on "
        f"{os.cpu_count()} cores). On an idle machine or a GPU the ratio differs: re-measure there.",
    ]
    print("\n".join(lines))
    path = args.work / "midlayer_benchmark.json"
    path.write_text(
        json.dumps(
            {
                "seconds": seconds,
                "forwards": forwards,
                "evaluations": evaluations,
                "agree": agree,
                "stack_rows": new_rows,
                "masks_per_forward": k,
                "subset_masks": args.masks,
                "setup_seconds": setup,
                "overhead_seconds_per_forward": overhead,
                "load_average": loads,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

"""Explanation methods on equal terms, on neurons the offline settings were not tuned on.

Settings: smollm2-135m MLP layers 8 and 22 (the offline backend was developed on layer 15) and the
encoder minilm-l6 MLP layer 3; bbc-news, 60 texts per class (300), first 64 tokens. Per setting, 20
neurons sampled (seed 0) among those whose 99.5th-percentile activation lies above the median
selectivity ((q99.5 - mean) / std over non-first tokens). Methods (rangelens.explain.loop):
iterative (NeuronScope, offline lexical backend), single-pass with an equal budget (best of as many
candidates, same acceptance pool), single-pass first candidate, best-of-N control (the loop with
random instead of worst-fit feedback), per-token lookup table. Paired bootstrap intervals over
neurons (10,000 resamples, seed 0). With ``--base-url``, the same protocol also runs with a local LLM
(llama.cpp server) as the explainer on 5 layer-8 neurons.

    PYTHONPATH=src python benchmarks/explain_eval.py            # explain (resumes), then report
    PYTHONPATH=src python benchmarks/explain_eval.py --base-url http://127.0.0.1:8765/v1
    PYTHONPATH=src python benchmarks/explain_eval.py --report   # report only
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from rangelens.activations.capture import capture
from rangelens.activations.models import load_model
from rangelens.activations.sites import resolve_site
from rangelens.assets import cache_dir
from rangelens.data import load_texts
from rangelens.explain import OpenAIClient, explain_record, make_roles, records_from_activations
from rangelens.explain.clients import LLM, ResponseCache
from rangelens.explain.exemplars import token_strings
from rangelens.explain.llm import LLMExplainer, llm_roles
from rangelens.explain.loop import NeuronExplanation
from rangelens.explain.roles import Roles

SETTINGS = [("smollm2-135m", 8), ("smollm2-135m", 22), ("minilm-l6", 3)]
N_NEURONS, ROUNDS, N_BOOT = 20, 4, 10_000
OUT = cache_dir() / "bench" / "explain_eval"
# With --base-url: the same protocol with an LLM (served locally) as decomposer, clusterer,
# explainer and refiner, on the first N_LLM neurons of the layer-8 sample; the lexical simulator
# and judge score its text (LLM simulation of every candidate is out of reach on 2 CPU cores).
# Kept small for a 0.5B model on 2 CPU cores (prompts of ~1,000 tokens take 15-60 s there): one
# refinement round, 4 exemplars to decompose, 3 activating and 1 non-activating shown to explain.
LLM_SETTING, N_LLM, LLM_ROUNDS = ("smollm2-135m", 8), 5, 1
METHODS = [
    ("iterative", "iterative (NeuronScope)"),
    ("single_pass", "single-pass, equal budget"),
    ("single_pass_first", "single-pass, 1 candidate"),
    ("control", "best-of-N control (random feedback)"),
    ("lookup", "lookup table (token -> mean)"),
]
LLM_TITLE = (
    ", LLM explainer (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, llama.cpp server; 1 refinement round)"
)
EXTRA = ("cpu_seconds", "wall_seconds", "llm_steps", "llm_failed_steps")
METRICS = [
    ("held_out", "held-out r"),
    ("auc", "detection AUC"),
    ("balanced_accuracy", "detection bal. acc."),
    ("judge_accuracy", "judge detection bal. acc."),
    ("fuzz_accuracy", "fuzzing bal. acc."),
]


def neurons_and_records(model: str, layer: int) -> list:
    lm = load_model(model)
    site = resolve_site(lm.model, "mlp", layer)
    cache = OUT / f"{model}-mlp{layer}.npz"
    if not cache.exists():
        texts = load_texts("bbc-news", max_per_class=60, seed=0).texts
        acts = capture(lm, texts, [site], position="tokens", max_length=64, progress=False)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, acts=acts.acts[site.name], ids=acts.token_ids, off=acts.offsets)
    z = np.load(cache)
    values, ids, off = z["acts"], z["ids"], z["off"]
    body = np.ones(len(values), bool)
    body[off[:-1]] = False
    rest = values[body]
    selectivity = (np.quantile(rest, 0.995, axis=0) - rest.mean(0)) / (rest.std(0) + 1e-12)
    pool = np.flatnonzero(selectivity > np.median(selectivity))
    neurons = sorted(np.random.default_rng(0).choice(pool, N_NEURONS, replace=False).tolist())
    return records_from_activations(
        values[:, neurons],
        ids,
        token_strings(lm, ids),
        off,
        neurons,
        model=model,
        site="mlp",
        layer=layer,
    )


def llm_roles_for(base_url: str, llm_model: str) -> tuple[Roles, LLM]:
    """LLM roles over an OpenAI-compatible server, replies cached under OUT, two tries a step."""
    client = OpenAIClient(base_url, llm_model, timeout=300, max_concurrency=1, max_tokens=300)
    llm = LLM(client, ResponseCache(OUT / "llm-cache"), attempts=2)
    roles = llm_roles(llm, name="llm", n_exemplars=4, simulator="lexical")
    return replace(roles, explainer=LLMExplainer(llm, n_shown=3, n_negative=1)), llm


def run(base_url: str | None, llm_model: str) -> None:
    offline = make_roles("offline")
    jobs = [(m, layer, f"{m}-mlp{layer}", offline, N_NEURONS, ROUNDS) for m, layer in SETTINGS]
    llm: LLM | None = None
    if base_url is not None:
        roles, llm = llm_roles_for(base_url, llm_model)
        model, layer = LLM_SETTING
        jobs.append((model, layer, f"{model}-mlp{layer}-llm", roles, N_LLM, LLM_ROUNDS))
    for model, layer, name, roles, n, rounds in jobs:
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        for record in neurons_and_records(model, layer)[:n]:
            path = folder / f"{record.neuron}.json"
            if path.exists():
                continue
            start, wall = time.process_time(), time.time()
            before = llm.stats.to_dict() if llm is not None and roles.name == "llm" else None
            result = explain_record(record, roles, rounds=rounds)
            data = {
                **result.to_dict(),
                "cpu_seconds": time.process_time() - start,
                "wall_seconds": time.time() - wall,
            }
            if before is not None and llm is not None:
                after = llm.stats.to_dict()
                data["llm_steps"] = after["steps"] - before["steps"]
                data["llm_failed_steps"] = after["failed_steps"] - before["failed_steps"]
            path.write_text(json.dumps(data))
            print(
                f"{model} L{layer} n{record.neuron}: it {result.iterative.held_out:.3f} "
                f"sp {result.single_pass.held_out:.3f} lookup {result.lookup.held_out:.3f}"  # type: ignore[union-attr]
                f" [{data['cpu_seconds']:.1f}s]",
                flush=True,
            )


def ci(x: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval over neurons."""
    boots = x[rng.integers(0, len(x), (N_BOOT, len(x)))].mean(1)
    return float(x.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def fmt(c: tuple[float, float, float]) -> str:
    return f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}]"


def report() -> None:
    lines = [
        "# Explanation methods on equal terms (rangelens.explain, offline lexical baseline)",
        "",
        (__doc__ or "").split("\n\n    PYTHONPATH")[0].strip(),
        "",
        "Pools per neuron (disjoint, checked): explain 40 texts shown (20 top + 20 quantile "
        "samples), feedback 16 (the refiner's worst-fit texts), validation 16 (acceptance), "
        "held-out 20 (half top-activating, half random; final scores only). Calibration (linear) "
        "and the detection threshold are fitted on feedback + validation. Correlation: all held-out "
        "tokens at once (Bills et al. 2023). Detection: text-level, activating = maximum above the "
        "neuron's 80th percentile of text maxima. Judge detection / fuzzing: delphi-style, by the "
        "lexical judge reading only the explanation text (fuzzing: each activating text with its "
        "peak tokens vs as many random tokens highlighted). Timings are CPU seconds on a 2-core "
        "machine shared with other jobs (noisy).",
        "",
        "Reproduce: `PYTHONPATH=src python benchmarks/explain_eval.py` (results cached under "
        "`~/.cache/rangelens/bench/explain_eval/`, reruns only report).",
    ]
    examples: list[str] = []
    sections = [(m, layer, f"{m}-mlp{layer}", "") for m, layer in SETTINGS]
    sections.append((*LLM_SETTING, f"{LLM_SETTING[0]}-mlp{LLM_SETTING[1]}-llm", LLM_TITLE))
    for model, layer, name, title in sections:
        folder = OUT / name
        data = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        if not data:
            continue
        res = [NeuronExplanation.from_dict({k: d[k] for k in d if k not in EXTRA}) for d in data]
        rng = np.random.default_rng(0)
        lines += [
            "",
            f"## {model}, MLP layer {layer}{title}: {len(res)} neurons",
            "",
            "| method | " + " | ".join(m[1] for m in METRICS) + " | empty |",
            "|---|" + "---|" * (len(METRICS) + 1),
        ]
        table: dict[str, dict[str, np.ndarray]] = {}
        for key, name in METHODS:
            rows = [getattr(e, key) for e in res]
            table[key] = {}
            cells = []
            for metric, _ in METRICS:
                vals = [getattr(r, metric) if r is not None else None for r in rows]
                if any(v is None for v in vals):
                    cells.append("–")
                    continue
                x = np.array(vals, dtype=float)
                table[key][metric] = x
                c = ci(x, rng)
                cells.append(f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]")
            empty = sum(bool(r is not None and r.empty) for r in rows)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {empty} |")
        lines += [
            "",
            "Paired differences (mean over neurons [95% bootstrap interval]; wins / ties / losses "
            "on held-out r, ties within 0.005):",
            "",
            "| comparison | held-out r | detection AUC | wins / ties / losses |",
            "|---|---|---|---|",
        ]
        for a, b in [
            ("iterative", "single_pass"),
            ("iterative", "lookup"),
            ("iterative", "control"),
            ("single_pass", "single_pass_first"),
        ]:
            d = table[a]["held_out"] - table[b]["held_out"]
            dauc = table[a]["auc"] - table[b]["auc"]
            wins, losses = int((d > 0.005).sum()), int((d < -0.005).sum())
            lines.append(
                f"| {a} − {b} | {fmt(ci(d, rng))} | {fmt(ci(dauc, rng))} | "
                f"{wins} / {len(d) - wins - losses} / {losses} |"
            )
        modes = [len(e.modes) for e in res]
        no_range = sum(m.lo is None for e in res for m in e.modes)
        cpu = [d["cpu_seconds"] for d in data]
        lines += [
            "",
            f"Modes per neuron: mean {np.mean(modes):.1f}; modes owning no explain-set exemplar "
            f"(shown without a range): {no_range} of {sum(modes)}. Candidates scored per neuron "
            f"(the single-pass budget): mean {np.mean([e.n_candidates for e in res]):.1f}. "
            f"CPU seconds per neuron: median {np.median(cpu):.1f}, total {np.sum(cpu):.0f}.",
        ]
        if "llm_steps" in data[0]:
            by_role = Counter(f.role for e in res for f in e.failures)
            wall = [d["wall_seconds"] for d in data]
            lines.append(
                f"\nLLM steps: {sum(d['llm_steps'] for d in data)}, failed "
                f"{sum(d['llm_failed_steps'] for d in data)} (by role: {dict(by_role) or 'none'}); "
                f"wall seconds per neuron: median {np.median(wall):.0f}."
            )
        for e in res[:2]:
            examples.append(
                f"- {model} L{layer} neuron {e.neuron} (held-out r iterative "
                f"{e.iterative.held_out:.3f}, single-pass {e.single_pass.held_out:.3f}, lookup "
                f"{e.lookup.held_out if e.lookup else float('nan'):.3f}):\n"
                + "\n".join(
                    f"  - `{m.explanation}` — range "
                    + (f"[{m.lo:.2f}, {m.hi:.2f}]" if m.lo is not None else "none (no exemplar)")
                    for m in e.modes
                )
                + f"\n  - single-pass: `{e.single_pass_mode.explanation}`"
            )
    lines += ["", "## Example explanations", "", *examples]
    (Path(__file__).parent / "EXPLAIN_RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", action="store_true", help="only write EXPLAIN_RESULTS.md")
    parser.add_argument(
        "--base-url", help="also run the LLM setting on this OpenAI-compatible server"
    )
    parser.add_argument("--llm-model", default="local", help="served model name")
    args = parser.parse_args()
    if not args.report:
        run(args.base_url, args.llm_model)
    report()


if __name__ == "__main__":
    main()

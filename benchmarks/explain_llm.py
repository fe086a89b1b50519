"""LLM explanations of smollm2-135m MLP neurons scored from their text alone, vs the lexical baseline.

A small local chat LLM (served by llama.cpp / vLLM / Ollama through ``--base-url``) writes one
contrastive explanation per neuron; the offline backend's single-pass explanation is the lexical
baseline. Both texts are scored by the same LLM on the same held-out texts: simulation correlation
(Bills et al. 2023; in the list format, as Qwen2.5-0.5B cannot echo a token list), delphi detection
and fuzzing (balanced accuracy, AUC); the per-token lookup table fitted on the explain pool is the
reference a useful explanation should approach. A *mismatched* control scores each neuron with another neuron's LLM
explanation. Intervals: 95% paired bootstrap over neurons of the per-neuron difference. Every failed
LLM step is counted; failed texts are left out of a score, never scored as zero.

    python -m llama_cpp.server --model QWEN.gguf --host 127.0.0.1 --port 8765 --logits_all true
    PYTHONPATH=src python benchmarks/explain_llm.py --base-url http://127.0.0.1:8765/v1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rangelens.activations.capture import capture
from rangelens.activations.models import load_model
from rangelens.activations.sites import resolve_site
from rangelens.assets import cache_dir
from rangelens.data import load_texts
from rangelens.explain import ExemplarConfig, OpenAIClient, records_from_activations
from rangelens.explain.clients import LLM, ResponseCache
from rangelens.explain.evaluation import LookupTable, fuzz_set, judged
from rangelens.explain.exemplars import token_strings
from rangelens.explain.lexical import LexicalSimulator
from rangelens.explain.llm import LLMExplainer
from rangelens.explain.llm_scoring import (
    LLMJudge,
    LLMSimulator,
)
from rangelens.explain.offline import OfflineExplainer
from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.explain.roles import FailureLog
from rangelens.explain.scoring import correlation
from rangelens.explain.semantic import SemanticJudge

LAYER, MAX_LENGTH = 8, 24
CONFIG = ExemplarConfig(
    n_top=12, n_quantile_bins=2, n_per_bin=4, n_feedback=8, n_validation=8, n_held_out=8, seed=0
)
SIM_FORMAT = "list"  # Qwen2.5-0.5B cannot echo a token list (see docs/LLM.md)
METRICS = ("corr", "det_bacc", "det_auc", "fuzz_bacc", "fuzz_auc", "sem_auc")


def pick_records(n: int) -> list[NeuronRecord]:
    """``n`` neurons of layer 8 (not used to tune the offline backend) with a real activating
    tail, sampled with seed 1; exemplars from 200 bbc-news texts (first 32 tokens)."""
    lm = load_model("smollm2-135m")
    site = resolve_site(lm.model, "mlp", LAYER)
    texts = load_texts("bbc-news", max_per_class=40, seed=0).texts
    acts = capture(lm, texts, [site], position="tokens", max_length=MAX_LENGTH, progress=False)
    assert acts.token_ids is not None and acts.offsets is not None
    values, off = acts.acts[site.name], acts.offsets
    body = np.ones(len(values), bool)
    body[off[:-1]] = False
    rest = values[body]
    selectivity = (np.quantile(rest, 0.995, axis=0) - rest.mean(0)) / rest.std(0)
    pool = np.flatnonzero(selectivity > np.median(selectivity))
    neurons = sorted(np.random.default_rng(1).choice(pool, n, replace=False).tolist())
    return records_from_activations(
        values[:, neurons],
        acts.token_ids,
        token_strings(lm, acts.token_ids),
        off,
        neurons,
        model="smollm2-135m",
        site="mlp",
        layer=LAYER,
        config=CONFIG,
    )


def subset(record: NeuronRecord, n: int) -> list[ActivationRecord]:
    """``n`` held-out texts, half activating (the top ones) and half not, in held-out order."""
    pos = [r for r in record.held_out if r.max_activation >= record.threshold]
    neg = [r for r in record.held_out if r.max_activation < record.threshold]
    return pos[: n - min(n // 2, len(neg))] + neg[: n // 2]


def score(
    llm: LLM, explanation: str, record: NeuronRecord, trace: FailureLog, n_sim: int, n_judge: int
) -> dict[str, float]:
    """Simulation correlation over the tokens of ``n_sim`` held-out texts simulated successfully
    (skipped when 0), detection on ``n_judge`` held-out texts and fuzzing on their activating
    ones (skipped when 0); failures counted."""
    nan = float("nan")
    out: dict[str, float] = {}
    if n_sim:
        held = subset(record, n_sim)
        simulator = LLMSimulator(llm, format=SIM_FORMAT)
        preds = simulator.simulate(explanation, [r.tokens for r in held], trace)
        ok = [i for i, p in enumerate(preds) if p is not None]
        sim = [preds[i] for i in ok]
        out["corr"] = (
            correlation(np.concatenate(sim), np.concatenate([held[i].activations for i in ok]))  # type: ignore[arg-type]
            if ok
            else nan
        )
        out["sim_failed"] = float(len(preds) - len(ok))
        out["sim_listed"], out["sim_absent"] = float(simulator.listed), float(simulator.absent)
    if not n_judge:
        return out
    items = subset(record, n_judge)
    labels = np.array([r.max_activation >= record.threshold for r in items])
    verdicts = LLMJudge(llm).judge(explanation, [r.tokens for r in items], None, trace)
    det = judged(verdicts, labels)
    ftexts, marks, flabels = fuzz_set(items, record.threshold, seed=record.neuron)
    fuzzed = LLMJudge(llm).judge(explanation, [r.tokens for r in ftexts], marks, trace)
    fuzz = judged(fuzzed, flabels)
    det_ok = any(v is not None for v in verdicts)  # all failed: no score, not chance
    fuzz_ok = any(v is not None for v in fuzzed)
    out.update(
        det_bacc=det.balanced_accuracy if det_ok else nan,
        det_auc=det.auc if det_ok else nan,
        fuzz_bacc=fuzz.balanced_accuracy if fuzz_ok else nan,
        fuzz_auc=fuzz.auc if fuzz_ok else nan,
        det_failed=float(verdicts.count(None)),
        fuzz_failed=float(fuzzed.count(None)),
    )
    return out


def _auc(value: float | None) -> float:
    return float("nan") if value is None else value


def score_lexical(explanation: str, held: list[ActivationRecord]) -> float:
    """Correlation of the offline lexical simulator reading ``explanation`` on ``held``."""
    preds = LexicalSimulator().simulate(explanation, [r.tokens for r in held], FailureLog())
    ok = [i for i, p in enumerate(preds) if p is not None]
    if not ok:
        return float("nan")
    sim = np.concatenate([preds[i] for i in ok])  # type: ignore[misc]
    return correlation(sim, np.concatenate([held[i].activations for i in ok]))


def paired_interval(a: Sequence[float], b: Sequence[float], seed: int = 0) -> str:
    """Mean of a - b over neurons with a 95% bootstrap interval (neurons with NaN left out)."""
    d = np.array(a) - np.array(b)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return "n/a"
    rng = np.random.default_rng(seed)
    boots = rng.choice(d, size=(10000, len(d))).mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8765/v1")
    parser.add_argument("--llm-model", default="local")
    parser.add_argument("--neurons", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--sim-texts", type=int, default=8)
    parser.add_argument("--judge-texts", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/explain_llm.json"))
    parser.add_argument("--report", action="store_true", help="only rewrite the report from --out")
    parser.add_argument(
        "--no-lexical-llm-scores",
        action="store_true",
        help="score the lexical explanation by the embedding judge and the offline simulator "
        "only (saves a third of the LLM calls on a slow server)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).parent / "EXPLAIN_LLM_RESULTS.md",
        help="the report file written",
    )
    parser.add_argument(
        "--model-name",
        default="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        help="the served model, as the report names it",
    )
    args = parser.parse_args()
    if args.report:
        write_report(json.loads(args.out.read_text()), args)
        return
    start = time.time()
    saved = cache_dir() / "bench" / f"explain-llm-records-{args.neurons}"
    if saved.is_dir():
        records = [NeuronRecord.load(p) for p in sorted(saved.glob("*.json"))]
    else:
        records = pick_records(args.neurons)
        for i, rec in enumerate(records):
            rec.save(saved / f"{i:02d}.json")
    client = OpenAIClient(
        args.base_url, args.llm_model, timeout=args.timeout, max_concurrency=1, max_tokens=300
    )
    llm = LLM(client, ResponseCache(cache_dir() / "bench" / "explain-llm-cache"), attempts=2)
    explanations: dict[str, list[str]] = {"llm": [], "lexical": []}
    failures: dict[str, int] = {}

    def count(trace: FailureLog) -> None:
        for f in trace.failures:
            print(f"  {f.role} failure: {f.error}", flush=True)
            failures[f.role] = failures.get(f.role, 0) + 1

    seconds: list[float] = []
    for rec in records:
        clock = time.time()
        trace = FailureLog()
        mode = LLMExplainer(llm, n_shown=3, n_negative=1).explain_top(rec, 3, trace)
        count(trace)
        explanations["llm"].append(mode.explanation)
        lexical = OfflineExplainer().explain_top(rec, len(rec.top), trace)
        explanations["lexical"].append(lexical.explanation)
        print(f"neuron {rec.neuron}: {mode.explanation!r} | {lexical.explanation!r}", flush=True)
        seconds.append(time.time() - clock)
    n = len(records)
    explanations["mismatched"] = [explanations["llm"][(i + 1) % n] for i in range(n)]
    rows: dict[str, list[dict[str, float]]] = {
        m: [] for m in (*explanations, "lexical-offline", "lookup")
    }
    result: dict = {
        "neurons": [r.neuron for r in records],
        "explanations": explanations,
        "sim_texts": args.sim_texts,
        "judge_texts": args.judge_texts,
        "no_lexical_llm_scores": args.no_lexical_llm_scores,
        "command": "python benchmarks/explain_llm.py " + " ".join(sys.argv[1:]),
    }
    judge = SemanticJudge()
    llm_scored = ("llm", "mismatched") if args.no_lexical_llm_scores else tuple(explanations)
    for i, rec in enumerate(records):
        clock = time.time()
        for method in ("llm", "lexical", "mismatched"):
            trace = FailureLog()
            text = explanations[method][i]
            scored = method in llm_scored and text
            row = score(llm, text, rec, trace, args.sim_texts, args.judge_texts) if scored else {}
            row["sem_auc"] = _auc(judge.judge(text, rec.held_out, rec.threshold).auc)
            rows[method].append(row)
            count(trace)
            print(method, rec.neuron, rows[method][-1], flush=True)
        held = subset(rec, args.sim_texts)
        rows["lexical-offline"].append({"corr": score_lexical(explanations["lexical"][i], held)})
        explain_pool = rec.top + rec.quantiles + rec.feedback + rec.validation
        lookup = LookupTable.fit(explain_pool).predict(held)
        truth = np.concatenate([r.activations for r in held])
        rows["lookup"].append({"corr": correlation(np.concatenate(lookup), truth)})  # type: ignore[arg-type]
        seconds[i] += time.time() - clock
        result.update(
            seconds_per_neuron=seconds,
            scores=rows,
            failed_steps_by_role=failures,
            llm=llm.stats.to_dict(),
            seconds=time.time() - start,
        )
        args.out.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    write_report(result, args)


def write_report(result: dict, args: argparse.Namespace) -> None:
    """``benchmarks/EXPLAIN_LLM_RESULTS.md``: the settings, then :func:`table`."""
    n = len(result["neurons"])
    text = "\n".join(
        [
            "# A small local LLM as explainer and scorer (rangelens.explain.llm_scoring)",
            "",
            f"Model: {args.model_name}, served by llama-cpp-python's OpenAI-compatible server on "
            "this 2-core CPU machine (temperature 0, two tries per step, `--logits_all true`). "
            f"Neurons: {n} smollm2-135m MLP layer-{LAYER} neurons with an activating tail (seed 1; "
            "the offline backend was tuned on layer 15), exemplars from 200 bbc-news texts "
            f"(first {MAX_LENGTH} tokens). Each neuron: one contrastive LLM explanation (3 "
            "activating, 1 non-activating and hard-negative exemplars), the lexical baseline's "
            "single-pass explanation, and a mismatched control (the next neuron's LLM "
            f"explanation). Scored by the same LLM from the text alone on {result['sim_texts']} "
            "held-out texts (simulation, list format)"
            + (
                f" and {result['judge_texts']} held-out texts (detection; fuzzing on their "
                "activating ones)"
                if result["judge_texts"]
                else " (detection and fuzzing not run: `--judge-texts 0`)"
            )
            + (
                "; the lexical explanation is not scored by the LLM (`--no-lexical-llm-scores`)"
                if result.get("no_lexical_llm_scores")
                else ""
            )
            + ". Every explanation is also scored by the embedding judge (all-MiniLM-L6-v2: AUC "
            "of its similarity to the activating vs other held-out texts; no LLM). Intervals: "
            "95% bootstrap over neurons; paired for differences. Failed steps are left out of a "
            "score and counted, never scored as zero.",
            "",
            f"Reproduce: `{result.get('command', 'python benchmarks/explain_llm.py')}` against "
            "the server of the module docstring; `--report` rewrites this file from `--out`.",
            "",
            table(result),
            "",
        ]
    )
    args.results.write_text(text)
    print(text)


def interval(a: Sequence[float], seed: int = 0) -> str:
    """Mean over neurons with a 95% bootstrap interval (NaN neurons left out)."""
    x = np.array(a, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return "n/a"
    boots = np.random.default_rng(seed).choice(x, size=(10000, len(x))).mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return f"{x.mean():.3f} [{lo:.3f}, {hi:.3f}]"


NAMES = {
    "corr": "simulation r (list format)",
    "det_bacc": "detection bal. acc.",
    "det_auc": "detection AUC",
    "fuzz_bacc": "fuzzing bal. acc.",
    "fuzz_auc": "fuzzing AUC",
    "sem_auc": "embedding-judge AUC (all-MiniLM-L6-v2, no LLM)",
}


def table(result: dict) -> str:
    """Markdown: each method's mean with a 95% bootstrap interval over neurons, the paired
    differences, the references and the failure and listing counts."""
    rows = result["scores"]
    nan = float("nan")

    def col(method: str, metric: str) -> list[float]:
        return [r.get(metric, nan) for r in rows[method]]

    def total(method: str, key: str) -> int:
        return int(sum(r.get(key, 0.0) for r in rows[method]))

    lines = [
        "| metric | LLM explanation | lexical explanation | mismatched LLM explanation (control) "
        "| LLM − lexical | LLM − mismatched |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        cells = [interval(col(k, m)) for k in ("llm", "lexical", "mismatched")]
        if all(c == "n/a" for c in cells):
            continue  # not run (e.g. --judge-texts 0)
        lines.append(
            f"| {NAMES[m]} | {' | '.join(cells)} | "
            f"{paired_interval(col('llm', m), col('lexical', m))} | "
            f"{paired_interval(col('llm', m), col('mismatched', m))} |"
        )
    lines += [
        "",
        "References on the same held-out texts (simulation r): the lexical explanation read by the "
        f"offline lexical simulator {interval(col('lexical-offline', 'corr'))}; the per-token "
        f"lookup table fitted on the explain pool {interval(col('lookup', 'corr'))}; LLM "
        f"explanation − lookup {paired_interval(col('llm', 'corr'), col('lookup', 'corr'))}.",
        "",
        f"LLM steps: {result['llm']['steps']} ({result['llm']['cache_hits']} from the reply "
        f"cache), failed {result['llm']['failed_steps']}; failed attempts by kind: "
        f"{result['llm']['failed_attempts'] or 'none'}; failed steps by role: "
        f"{result['failed_steps_by_role'] or 'none'}. Texts the simulator could not score: "
        + ", ".join(f"{k} {total(k, 'sim_failed')}" for k in ("llm", "lexical"))
        + "; judged items without an answer: "
        + ", ".join(
            f"{k} {total(k, 'det_failed') + total(k, 'fuzz_failed')}"
            for k in ("llm", "lexical", "mismatched")
        )
        + ". Words the simulator listed that the text does not contain: "
        + ", ".join(
            f"{k} {total(k, 'sim_absent')} of {total(k, 'sim_listed')}" for k in ("llm", "lexical")
        )
        + f". Wall time {result['seconds'] / 60:.0f} min"
        + (
            f"; seconds per neuron (explanation + its LLM scoring): "
            f"{interval(result['seconds_per_neuron'])}."
            if "seconds_per_neuron" in result
            else "."
        ),
        "",
        "Explanations (LLM | lexical baseline):",
        "",
        *(
            f"- neuron {n}: {a!r} | `{b}`"
            for n, a, b in zip(
                result["neurons"],
                result["explanations"]["llm"],
                result["explanations"]["lexical"],
                strict=True,
            )
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

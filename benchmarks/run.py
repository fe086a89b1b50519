"""rangelens benchmark suite: side-by-side measurements in one run, reported as ratios.

Writes ``benchmarks/RESULTS.md`` with the machine, library versions and raw figures. Sections:

- capture: rangelens capture at a middle and the last block vs a bare `transformers` forward on
  the same batches, a hand-written hook that raises, nnsight and TransformerLens (when installed)
  and a module-tracing dict over the full forward (the NeuronLens reference code's approach);
- memory: peak RSS of the streaming analysis at 1x, 4x and 10x the examples (separate processes);
- intervene: hooked vs bare forward for a RangeMask;
- suffix: the erasure experiment with vs without suffix-only evaluation;
- explain: offline NeuronScope explanations per minute.

Usage: ``python benchmarks/run.py [--quick]``; with the peers, from a venv holding them:
``PYTHONPATH=src /tmp/benchenv/bin/python benchmarks/run.py``. Sections it does not write
(another benchmark's, ``demo_stages.py``'s marked block) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rangelens.activations.capture import TokenBatch, capture, model_inputs, pool, tokenize
from rangelens.activations.models import LoadedModel, builtin_model_dir, load_model
from rangelens.activations.sites import blocks, resolve_site
from rangelens.artifacts import write_text
from rangelens.config import AnalysisConfig
from rangelens.data import load_texts
from rangelens.erasure import ErasureConfig, ErasureProtocol, erasure_ranges, run_erasure
from rangelens.explain import explain_neurons, make_roles
from rangelens.intervene import RangeMask
from rangelens.provenance import library_versions
from rangelens.ranges.captured import peak_rss_mb, run_capture

HERE = Path(__file__).resolve().parent
SECTIONS = ("capture", "intervene", "memory", "suffix", "explain")


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (seconds), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peer_capturers(
    lm: LoadedModel, batches: list[TokenBatch], layer: int
) -> dict[str, Callable[[], object]]:
    """The same last-token capture done with nnsight and TransformerLens, each stopping after
    block ``layer`` (nnsight ``tracer.stop()``, TransformerLens ``stop_at_layer``), when installed
    (they live in a separate venv, see :func:`main`)."""
    peers: dict[str, Callable[[], object]] = {}
    try:
        from nnsight import LanguageModel

        nn_model = LanguageModel(lm.model, tokenizer=lm.tokenizer)

        def with_nnsight() -> None:
            for b in batches:
                inputs = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
                with nn_model.trace(inputs) as tracer:
                    out = nn_model.model.layers[layer].output.save()
                    tracer.stop()
                pool(out[0] if isinstance(out, tuple) else out, b.attention_mask, "last")

        peers["nnsight (trace, tracer.stop())"] = with_nnsight
    except ImportError:
        pass
    try:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(
            str(builtin_model_dir("smollm2-135m")), device="cpu", tokenizer=lm.tokenizer
        )
        hook = f"blocks.{layer}.hook_resid_post"

        def with_transformer_lens() -> None:
            with torch.inference_mode():
                for b in batches:
                    _, cache = bridge.run_with_cache(
                        b.input_ids,
                        names_filter=lambda n: n == hook,
                        stop_at_layer=layer + 1,
                        attention_mask=b.attention_mask,
                    )
                    pool(cache[hook], b.attention_mask, "last")

        peers["TransformerLens (run_with_cache, stop_at_layer)"] = with_transformer_lens
    except ImportError:
        pass
    return peers


class _Stop(Exception):
    pass


def bench_capture(
    lm: LoadedModel, texts: list[str], repeats: int, layer: int
) -> dict[str, dict[str, float]]:
    """Last-token capture of block ``layer``'s output: tokens/s of each method and its time as a
    share of a bare full forward (the decoder stack without the LM head)."""
    site = resolve_site(lm.model, "resid", layer)
    batches = tokenize(lm, texts, batch_size=16, max_length=64)
    n_tokens = sum(b.n_tokens for b in batches)
    base = lm.model.base_model  # the bare decoder stack, without the LM head
    _, layers = blocks(lm.model)

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                base(**model_inputs(base, b))

    def ours() -> None:
        capture(lm, texts, [site], position="last", batch_size=16, max_length=64, progress=False)

    def hook_and_raise() -> None:
        """By hand: a forward hook on the block that saves its output and raises to stop."""
        saved: list[torch.Tensor] = []

        def hook(_m: object, _a: object, out: object) -> None:
            saved.append(out[0] if isinstance(out, tuple) else out)  # type: ignore[arg-type,index]
            raise _Stop

        handle = layers[site.layer or 0].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                for b in batches:
                    try:
                        lm.model(**model_inputs(lm.model, b))
                    except _Stop:
                        pool(saved.pop(), b.attention_mask, "last")
        finally:
            handle.remove()

    def trace_all() -> None:
        """Reference-code style: a dict of every block's output over the full forward."""
        store: dict[str, torch.Tensor] = {}
        handles = [
            block.register_forward_hook(
                lambda _m, _a, out, i=i: store.__setitem__(
                    str(i), out[0] if isinstance(out, tuple) else out
                )
            )
            for i, block in enumerate(layers)
        ]
        try:
            with torch.inference_mode():
                for b in batches:
                    lm.model(**model_inputs(lm.model, b))
        finally:
            for h in handles:
                h.remove()

    methods: dict[str, Callable[[], object]] = {
        "bare transformers forward (all blocks)": bare,
        "rangelens capture": ours,
        "hand-written hook and raise": hook_and_raise,
        **peer_capturers(lm, batches, site.layer or 0),
        "tracing dict over the full forward (reference code)": trace_all,
    }
    seconds = {name: best_of(fn, repeats) for name, fn in methods.items()}
    t_bare = seconds["bare transformers forward (all blocks)"]
    return {
        name: {"tokens": n_tokens, "tokens_per_s": n_tokens / t, "time_vs_bare": t / t_bare}
        for name, t in seconds.items()
    }


def bench_memory_child(per_class: int) -> None:
    """Child process: streaming analysis capture at ``per_class`` examples; prints peak RSS."""
    config = AnalysisConfig(max_per_class=per_class, max_length=64)
    lm = load_model(config.model)
    data = load_texts(config.dataset, max_per_class=per_class, seed=0)
    before = peak_rss_mb()
    cap = run_capture(lm, data, config, progress=False)
    print(
        json.dumps(
            {
                "n": len(data),
                "peak_before": before,
                "peak_after": peak_rss_mb(),
                "tokens_per_s": cap.info["tokens_per_second"],
            }
        )
    )


def bench_memory(sizes: list[int]) -> list[dict[str, float]]:
    rows = []
    for per_class in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(per_class)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def bench_intervene(lm: LoadedModel, texts: list[str], repeats: int) -> dict[str, float]:
    """Hooked vs bare full forward with a RangeMask on 30% of a mid-layer's neurons."""
    site = resolve_site(lm.model, "resid", lm.n_layers // 2)
    rng = np.random.default_rng(0)
    k = int(0.3 * site.width)
    neurons = rng.choice(site.width, k, replace=False)
    mask = RangeMask(site, neurons, -np.ones(k), np.ones(k))
    batches = tokenize(lm, texts, batch_size=16, max_length=64)

    def forward() -> None:
        with torch.inference_mode():
            for b in batches:
                lm.model(**model_inputs(lm.model, b))

    def hooked() -> None:
        with mask.attach(lm.model):
            forward()

    t_bare, t_hooked = best_of(forward, repeats), best_of(hooked, repeats)
    return {"bare_s": t_bare, "hooked_s": t_hooked, "hooked_vs_bare": t_hooked / t_bare}


def bench_suffix(lm: LoadedModel, out: Path) -> dict[str, float]:
    """The erasure experiment (last-block site) with vs without suffix-only evaluation."""
    analysis = AnalysisConfig(max_per_class=20, max_length=64, taus=[1.0])
    data = load_texts(analysis.dataset, max_per_class=20, seed=0)
    cap = run_capture(lm, data, analysis, progress=False)
    seconds = {}
    for suffix in (True, False):
        config = ErasureConfig(ppl_texts=8, suffix=suffix, folds=2, conditions=["range", "neuron"])
        protocol = ErasureProtocol(lm, data, analysis, config)
        ranges = erasure_ranges(protocol, cap)
        start = time.perf_counter()
        run_erasure(
            lm, data, cap, ranges, analysis, config, out / f"suffix-{suffix}", progress=False
        )
        seconds[suffix] = time.perf_counter() - start
    return {
        "suffix_s": seconds[True],
        "full_s": seconds[False],
        "speedup": seconds[False] / seconds[True],
        "layers": lm.n_layers,
    }


def bench_explain(lm: LoadedModel, n_neurons: int) -> dict[str, float]:
    """Offline-backend NeuronScope explanations (iterative + single-pass) per minute."""
    texts = load_texts("bbc-news", max_per_class=30, seed=0).texts
    site = resolve_site(lm.model, "mlp", 15)
    start = time.perf_counter()
    explain_neurons(lm, texts, site, list(range(n_neurons)), roles=make_roles("offline", None))
    minutes = (time.perf_counter() - start) / 60
    return {"neurons": n_neurons, "minutes": minutes, "per_minute": n_neurons / minutes}


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """Markdown table lines; floats get two decimals (none when large)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def report(results: dict[str, object], rerun: list[str]) -> str:
    """RESULTS.md text: environment, then one section per benchmark (``rerun``: the sections
    measured this time; the others are an earlier run's)."""
    env = {
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **library_versions(),
    }
    captures: dict[str, dict[str, dict[str, float]]] = results["capture"]  # type: ignore[assignment]
    i: dict[str, float] = results["intervene"]  # type: ignore[assignment]
    memory: list[dict[str, float]] = results["memory"]  # type: ignore[assignment]
    sfx: dict[str, float] = results["suffix"]  # type: ignore[assignment]
    exp: dict[str, float] = results["explain"]  # type: ignore[assignment]
    lines = [
        "# rangelens benchmarks",
        "",
        "Generated by `python benchmarks/run.py`; ratios are measured side by side in one run.",
        *(
            []
            if set(rerun) == set(SECTIONS)
            else [
                "",
                f"This run measured: {', '.join(rerun)}; the other sections keep the figures "
                "of an earlier run (on the environment it recorded).",
            ]
        ),
        "",
        "## Environment",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        "",
        "## Capture throughput (smollm2-135m, 30 blocks, resid at a middle and the last block)",
        "",
        "Last-token capture of a block's output, batch 16, 64 tokens, the fastest of the "
        "repeats; time as a share of a bare forward through all blocks (below 1: faster, by "
        "stopping after the block). nnsight and TransformerLens run from a separate venv "
        "(`python -m venv --system-site-packages`, `pip install -c constraints nnsight "
        "transformer-lens` pinned to this torch and transformers).",
        "",
        *(
            line
            for where, c in captures.items()
            for line in [
                f"### {where}",
                "",
                *table(
                    ["method", "tokens/s", "time / bare forward"],
                    [[name, r["tokens_per_s"], r["time_vs_bare"]] for name, r in c.items()],
                ),
                "",
            ]
        ),
        "## RangeMask overhead (30% of resid neurons at the middle layer, full forward)",
        "",
        f"- bare {i['bare_s']:.2f} s, hooked {i['hooked_s']:.2f} s: "
        f"**{i['hooked_vs_bare']:.3f}x** (target <= 1.05x)",
        "",
        "## Peak memory of the streaming analysis (one process per size)",
        "",
        *table(
            ["examples", "peak RSS before capture (MB)", "after (MB)", "growth (MB)", "tokens/s"],
            [
                [
                    r["n"],
                    r["peak_before"],
                    r["peak_after"],
                    r["peak_after"] - r["peak_before"],
                    r["tokens_per_s"],
                ]
                for r in memory
            ],
        ),
        "",
        "## Suffix-only erasure evaluation (resid, last block; 16 conditions per fold, 2 folds over 100 texts, 8 ppl texts)",
        "",
        f"- full forwards {sfx['full_s']:.1f} s, suffix-only {sfx['suffix_s']:.1f} s: "
        f"**{sfx['speedup']:.1f}x** faster ({sfx['layers']:.0f} layers)",
        "",
        "## Explanations per minute (offline backend, mlp layer 15, iterative + single-pass)",
        "",
        f"- {exp['neurons']:.0f} neurons in {exp['minutes']:.2f} min: "
        f"**{exp['per_minute']:.1f} neurons/min** (one token-level capture included)",
        "",
        "```json",
        json.dumps(results, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer texts and repeats")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated sections to run; the others keep the figures of --out",
    )
    args = parser.parse_args()
    if args.memory_child:
        bench_memory_child(args.memory_child)
        return
    torch.manual_seed(0)
    repeats = 2 if args.quick else 3
    lm = load_model("smollm2-135m")
    texts = load_texts("bbc-news", max_per_class=8 if args.quick else 20, seed=0).texts
    middle, last = lm.n_layers // 2, lm.n_layers - 1
    benches: dict[str, Callable[[], object]] = {
        "capture": lambda: {
            f"block {middle} (middle)": bench_capture(lm, texts, repeats, middle),
            f"block {last} (last)": bench_capture(lm, texts, repeats, last),
        },
        "intervene": lambda: bench_intervene(lm, texts, repeats),
        "memory": lambda: bench_memory([10, 40] if args.quick else [20, 80, 200]),
        "suffix": lambda: bench_suffix(lm, Path(tempfile.mkdtemp(prefix="rangelens-bench-"))),
        "explain": lambda: bench_explain(lm, 3 if args.quick else 10),
    }
    chosen = args.sections.split(",")
    earlier = earlier_results(args.out) if set(chosen) != set(SECTIONS) else {}
    results = {k: benches[k]() if k in chosen else earlier[k] for k in SECTIONS}
    text = report(results, chosen)
    if args.out.exists():
        text += kept(args.out.read_text(), text)
    write_text(args.out, text)
    print(text)


def earlier_results(path: Path) -> dict[str, object]:
    """The figures embedded (as JSON) in an earlier ``RESULTS.md``."""
    found = re.search(r"```json\n(.*?)\n```", path.read_text(), flags=re.S)
    return json.loads(found.group(1)) if found else {}


def kept(old: str, generated: str) -> str:
    """What this script does not write but an earlier ``RESULTS.md`` holds, kept as is: marked
    blocks (``<!-- NAME:begin -->`` .. ``<!-- NAME:end -->``, e.g. demo_stages.py's) and
    ``## `` sections whose heading it does not generate (written by other benchmarks)."""
    marked = r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->"
    blocks = [m.group(0) for m in re.finditer(marked, old, flags=re.S)]
    rest = re.sub(marked, "", old, flags=re.S)
    heads = {line for line in generated.splitlines() if line.startswith("## ")}
    sections = re.split(r"(?m)^(?=## )", rest)[1:]
    others = [x.rstrip("\n") for x in sections if x.splitlines()[0] not in heads]
    return "".join(f"\n{x}\n" for x in [*others, *blocks])


if __name__ == "__main__":
    main()

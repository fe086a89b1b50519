"""Explanations at a served LLM's throughput, with no GPU: a local OpenAI-compatible stub server.

The stub (stdlib asyncio, HTTP/1.1 keep-alive, a process of its own) answers every request after a fixed ``--latency``,
serving at most ``--capacity`` requests at once (more wait in its queue), so its ceiling is
``min(capacity, concurrency) / latency`` requests/s. Its replies are well-formed for every LLM role
(decomposer, clusterer, explainer, refiner, echo simulator with log-probabilities, detection and
fuzzing judge) and DETERMINISTIC: a function of the request alone (a sha256 of it seeds every
choice), so any two runs get the same replies. ``usage`` is the stub's count (characters / 4).

Synthetic neurons (small records: ~10-token texts, 4 top exemplars, pools of 4-6 texts, one
refinement round) are explained through the real ``openai`` backend (``OpenAIClient`` -> ``LLM`` ->
the LLM roles -> the loop -> :func:`rangelens.explain.explain_records`) at each concurrency, each run
with a fresh reply cache; achieved requests/s are set against the ceiling. Then the neurons of the
largest run are explained again at concurrency 1 from that run's reply cache, and every explanation
must be identical.

    PYTHONPATH=src python benchmarks/explain_throughput.py            # the table in RESULTS.md
    PYTHONPATH=src python benchmarks/explain_throughput.py --neurons 100 --levels 1,64  # quick
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rangelens.explain import ExemplarConfig, OpenAIClient, make_roles, records_from_activations
from rangelens.explain.api import explain_records
from rangelens.explain.budget import estimate
from rangelens.explain.clients import LLM
from rangelens.explain.records import NeuronRecord
from rangelens.explain.schedule import Schedule

WORDS = [
    *("goal", "match", "team", "cup", "league", "striker", "shares", "bank", "market", "profit"),
    *("rates", "fund", "phone", "chip", "software", "screen", "camera", "data", "film", "actor"),
    *("music", "album", "stage", "crowd", "vote", "party", "minister", "court", "police", "rain"),
]
CONFIG = ExemplarConfig(
    n_top=4, n_quantile_bins=2, n_per_bin=1, n_feedback=4, n_validation=4, n_held_out=6, seed=0
)


# ------------------------------------------------------------------------------ the stub's replies


def _block(prompt: str, label: str) -> str:
    found = re.search(rf"<<<TEXT {re.escape(label)}\n(.*?)\nTEXT>>>", prompt, re.S)
    return found[1] if found else ""


def _marked(prompt: str) -> list[str]:
    """Words marked ``[[like this]]`` in the prompt's exemplars, in order, without repeats."""
    found = [w.strip().lower() for w in re.findall(r"\[\[(.*?)\]\]", prompt)]
    return list(dict.fromkeys(w for w in found if re.fullmatch(r"[a-z]+", w)))


def _choose(rng: random.Random, words: list[str], k: int) -> list[str]:
    pool = words or WORDS
    return sorted(rng.sample(pool, min(k, len(pool))), key=pool.index)


def _explanation(rng: random.Random, words: list[str]) -> dict[str, Any]:
    kw = _choose(rng, words, rng.randint(1, 3))
    return {"explanation": "the words " + ", ".join(f"'{w}'" for w in kw), "keywords": kw}


def _echo(rng: random.Random, prompt: str, logprobs: bool) -> tuple[str, list[Any] | None]:
    """One ``token<TAB>value`` line per token; values 6-9 for tokens the explanation names."""
    named = set(re.findall(r"'(\w+)'", _block(prompt, "explanation")))
    pieces: list[tuple[str, dict[str, float] | None]] = []
    for tok in _block(prompt, "tokens").split("\n"):
        value = rng.randint(6, 9) if tok.lower() in named else rng.choice((0, 0, 0, 1, 2))
        other = (value + 1) % 10
        p = rng.uniform(0.55, 0.95)
        pieces += [(tok, None), ("\t", None)]
        pieces += [(str(value), {str(value): math.log(p), str(other): math.log(1 - p)})]
        pieces.append(("\n", None))
    return "".join(t for t, _ in pieces), _logprob_items(pieces) if logprobs else None


def _logprob_items(pieces: list[tuple[str, dict[str, float] | None]]) -> list[Any]:
    return [
        {
            "token": tok,
            "logprob": (top or {}).get(tok, -0.01),
            "bytes": None,
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": None}
                for t, lp in (top or {tok: -0.01}).items()
            ],
        }
        for tok, top in pieces
    ]


def stub_reply(body: dict[str, Any]) -> tuple[str, str, list[Any] | None]:
    """The deterministic reply to a chat-completion request: (role asked, content, logprobs
    content)."""
    messages = body["messages"]
    key = json.dumps(messages, sort_keys=True).encode()
    rng = random.Random(hashlib.sha256(key).digest())
    prompt = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    logprobs = bool(body.get("logprobs"))
    if "Copy each of the" in prompt:
        return ("simulator", *_echo(rng, prompt, logprobs))
    if "Answer 1 (yes) or 0 (no)" in prompt:
        named = set(re.findall(r"'(\w+)'", _block(prompt, "explanation")))
        text = _block(prompt, "text").lower()
        yes = any(w in text for w in named) != (rng.random() < 0.1)
        answer, p = ("1" if yes else "0"), rng.uniform(0.6, 0.95)
        other = "0" if yes else "1"
        top = {answer: math.log(p), other: math.log(1 - p)}
        return "judge", answer, _logprob_items([(answer, top)]) if logprobs else None
    marked = _marked(prompt)
    if "make the neuron fire" in prompt:
        return (
            "decomposer",
            json.dumps({"components": _choose(rng, marked, rng.randint(1, 3))}),
            None,
        )
    if "groups of related meaning" in prompt:
        listing = re.findall(r"^(\d+): (.*)$", _block(prompt, "components"), re.M)
        k = rng.randint(1, min(3, len(listing)))
        groups: list[list[int]] = [[] for _ in range(k)]
        for i, _ in listing:
            groups[int(i) % k].append(int(i))
        modes = [{"label": f"{listing[g[0]][1]} and kin", "components": g} for g in groups]
        return "clusterer", json.dumps({"modes": modes}), None
    if "improved description" in prompt:
        modes = [
            {"label": f"{kw['keywords'][0]} group", **kw}
            for kw in (_explanation(rng, marked) for _ in range(rng.randint(1, 2)))
        ]
        return "refiner", json.dumps({"modes": modes}), None
    return "explainer", json.dumps(_explanation(rng, marked)), None


# ------------------------------------------------------------------------------------ the server


class StubServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1: every request is answered after
    ``latency`` seconds, at most ``capacity`` at once (the others wait in its queue). ``GET
    /stats`` answers what it served (``?reset``: and starts counting the peak and roles anew)."""

    def __init__(self, latency: float, capacity: int) -> None:
        self.latency, self.capacity = latency, capacity
        self.served = 0
        self.busy = self.peak = 0
        self.roles: Counter[str] = Counter()  # requests by the role that asked

    def serve_forever(self) -> None:
        """Serve until killed; the first line on stdout is the base URL."""

        async def main() -> None:
            self.slots = asyncio.Semaphore(self.capacity)
            server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=1024)
            print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
            await server.serve_forever()

        asyncio.run(main())

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /stats"):
                    payload = json.dumps(
                        {"served": self.served, "peak": self.peak, "roles": self.roles}
                    ).encode()
                    if head.startswith(b"GET /stats?reset"):
                        self.peak, self.roles = 0, Counter()
                else:
                    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                    body = json.loads(await reader.readexactly(length))
                    async with self.slots:
                        self.busy += 1
                        self.peak = max(self.peak, self.busy)
                        await asyncio.sleep(self.latency)
                        self.busy -= 1
                    payload = self._completion(body)
                    self.served += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def _completion(self, body: dict[str, Any]) -> bytes:
        role, content, logprobs = stub_reply(body)
        self.roles[role] += 1
        sent = sum(len(m["content"]) for m in body["messages"])
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        usage = {"prompt_tokens": -(-sent // 4), "completion_tokens": -(-len(content) // 4)}
        reply = {"id": "stub", "object": "chat.completion", "created": 0, "model": body["model"]}
        return json.dumps({**reply, "choices": [choice], "usage": usage}).encode()


class StubProcess:
    """:class:`StubServer` in a process of its own, as a real server is (it does not share the
    client's interpreter lock)."""

    def __init__(self, latency: float, capacity: int) -> None:
        serve = [sys.executable, __file__, "--serve", f"{latency},{capacity}"]
        self.proc = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()

    def stats(self, reset: bool = False) -> dict[str, Any]:
        root = self.url.removesuffix("/v1")
        with urllib.request.urlopen(f"{root}/stats{'?reset' if reset else ''}") as reply:
            return dict(json.loads(reply.read()))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# ---------------------------------------------------------------------------------- the neurons


def synthetic_records(
    n_neurons: int, n_texts: int = 40, seed: int = 0, config: ExemplarConfig = CONFIG
) -> list[NeuronRecord]:
    """``n_neurons`` neurons over one corpus of ``n_texts`` 10-word texts: each fires on 3 words of
    its own (plus noise)."""
    rng = np.random.default_rng(seed)
    tokens: list[str] = []
    offsets = [0]
    for _ in range(n_texts):
        tokens += [f" {w}" for w in rng.choice(WORDS, size=10)]
        offsets.append(len(tokens))
    ids = np.array([WORDS.index(t.strip()) for t in tokens])
    likes = np.stack([rng.choice(len(WORDS), 3, replace=False) for _ in range(n_neurons)])
    values = rng.normal(0, 0.05, (len(tokens), n_neurons))
    for j in range(n_neurons):
        values[:, j] += np.isin(ids, likes[j]) * rng.uniform(1, 3)
    return records_from_activations(
        values, ids, tokens, np.array(offsets), list(range(n_neurons)),
        model="synthetic", site="mlp", layer=0, config=config,
    )  # fmt: skip


def explain_at(
    records: list[NeuronRecord], url: str, concurrency: int, cache: Path
) -> tuple[list[dict[str, Any]], LLM, float]:
    """Explain ``records`` through the openai backend at ``concurrency`` requests in flight; the
    results (as saved), the LLM (its counts) and the wall time."""
    client = OpenAIClient(url, "stub", max_concurrency=concurrency, timeout=120)
    roles = make_roles("openai", client, cache_dir=cache)
    llm = roles.explainer.llm  # type: ignore[attr-defined]
    start = time.perf_counter()
    out = explain_records(
        records, roles, rounds=1, semantic=False, schedule=Schedule(concurrency, llm=llm)
    )
    return [e.to_dict() for e in out], llm, time.perf_counter() - start


def offline_side_by_side(n: int, repeats: int = 2) -> dict[str, Any]:
    """The offline backend (no LLM) on ``n`` neurons with the pipeline's pool sizes for 300 texts,
    one at a time vs two at once (2 cores), alternating, best of ``repeats`` each; and whether
    the results are the same."""
    from rangelens.explain.exemplars import scaled_config
    from rangelens.explain.offline import offline_roles

    records = synthetic_records(n, n_texts=300, config=scaled_config(300))
    roles = offline_roles()
    explain_records(records[:1], roles, rounds=1, semantic=False)  # load the embedder first
    times: dict[int, list[float]] = {1: [], 2: []}
    results: dict[int, list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for c in (1, 2):
            start = time.perf_counter()
            out = explain_records(records, roles, rounds=2, semantic=False, schedule=Schedule(c))
            times[c].append(time.perf_counter() - start)
            results[c] = [e.to_dict() for e in out]
    return {
        "neurons": n,
        "sequential_s": round(min(times[1]), 2),
        "two_at_once_s": round(min(times[2]), 2),
        "speedup": round(min(times[1]) / min(times[2]), 3),
        "identical": results[1] == results[2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=1000, help="neurons at the largest level")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrencies to measure")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per request")
    parser.add_argument(
        "--capacity", type=int, default=128, help="requests the stub serves at once"
    )
    parser.add_argument(
        "--seconds", type=float, default=60, help="target length of the smaller levels' runs"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--offline", type=int, default=0, help="only time the offline backend on this many neurons"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # LATENCY,CAPACITY: be the stub
    args = parser.parse_args()
    if args.serve:
        latency, capacity = args.serve.split(",")
        StubServer(float(latency), int(capacity)).serve_forever()
        return
    if args.offline:
        print(json.dumps(offline_side_by_side(args.offline)))
        return
    levels = [int(c) for c in args.levels.split(",")]
    server = StubProcess(args.latency, args.capacity)
    work = Path(tempfile.mkdtemp(prefix="rangelens-throughput-"))
    everything = synthetic_records(args.neurons)
    rows: list[dict[str, Any]] = []
    calls_per_neuron = 0.0
    last: tuple[list[dict[str, Any]], Path, list[NeuronRecord]] | None = None
    try:
        for c in levels:
            ceiling = min(args.capacity, c) / args.latency
            n = args.neurons
            if c != max(levels) and calls_per_neuron:  # a run of about --seconds
                n = max(2, min(n, round(args.seconds * ceiling / calls_per_neuron)))
            elif c != max(levels):
                n = max(2, min(n, c * 2))
            records = everything[:n]
            cache = work / f"cache-{c}"
            served = server.stats(reset=True)["served"]
            results, llm, seconds = explain_at(records, server.url, c, cache)
            seen = server.stats()
            stats = llm.stats
            assert seen["served"] - served == stats.requests, "every request reached the stub"
            calls_per_neuron = stats.requests / n
            est = estimate(records, rounds=1)
            rate = stats.requests / seconds
            rows.append(
                {
                    "concurrency": c,
                    "neurons": n,
                    "requests": stats.requests,
                    "cache_hits": stats.cache_hits,
                    "failed_tries": stats.failures,
                    "seconds": round(seconds, 1),
                    "requests_per_s": round(rate, 2),
                    "ceiling_per_s": round(ceiling, 2),
                    "of_ceiling": round(rate / ceiling, 3),
                    "requests_per_neuron": round(calls_per_neuron, 1),
                    "estimate_per_neuron": [est.requests[0] / n, est.requests[1] / n],
                    "prompt_tokens": stats.prompt_tokens,
                    "completion_tokens": stats.completion_tokens,
                    "estimate_tokens": [est.prompt_tokens, est.completion_tokens],
                    "stub_peak_busy": seen["peak"],
                    "requests_by_role": seen["roles"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            last = (results, cache, records)
        assert last is not None
        results, cache, records = last
        served = server.stats()["served"]
        again, llm, seconds = explain_at(records, server.url, 1, cache)
        identical = again == results
        replay = {
            "neurons": len(records),
            "identical": identical,
            "differing_neurons": sum(a != b for a, b in zip(again, results, strict=True)),
            "requests_sent": server.stats()["served"] - served,
            "seconds": round(seconds, 1),
        }
        print(json.dumps({"replay_at_concurrency_1": replay}), flush=True)
        summary = {
            "latency_s": args.latency,
            "capacity": args.capacity,
            "cpu_count": os.cpu_count(),
            "levels": rows,
            "replay_at_concurrency_1": replay,
        }
        if args.json is not None:
            args.json.write_text(json.dumps(summary, indent=1) + "\n")
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

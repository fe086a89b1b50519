"""What explaining neurons with an LLM costs: the requests and tokens estimated before a run from the
loop's structure, and the measured ones (and their price) after it.

The estimate counts the distinct requests one neuron makes when every step succeeds at its first try
(repeats are answered by the reply cache), from the sizes of its pools and the loop's knobs
(:func:`rangelens.explain.loop.explain_record`):

- start: one decomposer request per activating top exemplar (at most ``n_exemplars``), one
  clusterer request, one explainer request per mode and the single-pass explanation; each start
  simulated on the validation pool (one simulator request per text);
- each refinement round: the feedback pool simulated for the worst-fit texts (and per mode, with
  several modes), one refiner request, and each proposal simulated on the validation pool; the
  random-feedback control makes the same rounds without the worst-fit simulation;
- the equal-budget single-pass baseline: one explainer request and a validation pass per candidate
  (as many candidates as the loop scored); the no-feedback control: its blind edits (one explainer
  request per mode of three edits and one refiner request per round) and a validation pass each;
- the final scores of up to five methods (iterative, single-pass, its first candidate, the two
  controls; the same text is scored once): the feedback and held-out pools simulated, and the judge
  asked once per held-out text (detection) and twice per activating held-out text (fuzzing); each
  kept mode's own score: the activating explain-set texts simulated too.

It is a range, not a count: the low end assumes one mode, a plateau after ``patience`` rounds and
three distinct final texts (the controls often end where the loop did), the high end ``modes_high``
modes, every round and five; failed tries (retries) come on top, and repeats across neurons (the
same explanation of the same text) come from the cache. Tokens use the texts' mean length in
tokens and each prompt's fixed part (also an estimate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rangelens.explain.clients import LLMStats
from rangelens.explain.records import NeuronRecord

# Fixed prompt tokens (system prompt, worked example, instructions) and tokens per text token of
# each request kind, and reply tokens: measured on the prompts of rangelens.explain.llm /
# llm_scoring (rounded).
_SIM = (150, 2.2, 3.0)  # echo simulation: every token on its own line, echoed with a value
_JUDGE = (110, 1.3, 0.0)  # detection / fuzzing: the text once, a one-token answer
_EXPLAIN = (420, 12.0, 0.0)  # contrastive prompt with about six exemplars shown twice (marks, list)
_DECOMPOSE = (130, 2.5, 0.0)
_CLUSTER = (160, 0.0, 0.0)
_REFINE = (200, 9.0, 0.0)
_REPLY = {"explain": 45, "decompose": 20, "cluster": 60, "refine": 90, "judge": 1}


@dataclass(frozen=True)
class Estimate:
    """Requests and tokens for a batch of neurons, each a (low, high) range."""

    neurons: int
    requests: tuple[int, int]
    prompt_tokens: tuple[int, int]
    completion_tokens: tuple[int, int]

    def __add__(self, other: Estimate) -> Estimate:
        def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
            return (a[0] + b[0], a[1] + b[1])

        return Estimate(
            self.neurons + other.neurons,
            add(self.requests, other.requests),
            add(self.prompt_tokens, other.prompt_tokens),
            add(self.completion_tokens, other.completion_tokens),
        )


def _neuron(
    record: NeuronRecord,
    rounds: int,
    patience: int,
    modes: int,
    high: bool,
    n_exemplars: int,
) -> tuple[float, float, float]:
    """Requests, prompt tokens and reply tokens of one neuron with ``modes`` modes (``high``:
    every round, five distinct final texts)."""
    texts = [r for pool in (record.validation, record.feedback, record.held_out) for r in pool]
    t = sum(len(r.tokens) for r in texts) / max(len(texts), 1)
    v, f, h = len(record.validation), len(record.feedback), len(record.held_out)
    fuzz = 2 * sum(r.max_activation >= record.threshold for r in record.held_out)
    x = min(n_exemplars, sum(r.max_activation >= record.threshold for r in record.top))
    e = sum(r.max_activation >= record.threshold for r in record.explain_set)
    r = rounds if high else min(rounds, patience)
    finals = 5 if high else 3
    per_round = 1 + (2 if modes > 1 else 1)  # proposals: the revision (and the modes without it)
    refined = r * (per_round - 1)
    n_candidates = 2 + refined
    worst = modes * f if modes > 1 else 0
    sims = (
        2 * v  # the two starts
        + r * (worst + f + (per_round - 1) * v)  # the loop
        + r * (worst + (per_round - 1) * v)  # the random-feedback control
        + (n_candidates - 1) * v  # single-pass candidates
        + refined * v  # no-feedback control
        + finals * (f + h)  # final scores
        + (2 * modes + 1) * (e + (f + v + h) * (modes > 1))  # each kept mode's own score
    )
    judged = finals * (h + fuzz)
    nofeedback_rounds = math.ceil(refined / 4)
    explains = modes + 1 + (n_candidates - 1) + nofeedback_rounds * 3 * modes
    refines = 2 * r + nofeedback_rounds
    requests = x + 1 + explains + refines + sims + judged
    prompt = (
        sims * (_SIM[0] + _SIM[1] * t)
        + judged * (_JUDGE[0] + _JUDGE[1] * t)
        + explains * (_EXPLAIN[0] + _EXPLAIN[1] * t)
        + x * (_DECOMPOSE[0] + _DECOMPOSE[1] * t)
        + _CLUSTER[0]
        + refines * (_REFINE[0] + _REFINE[1] * t)
    )
    reply = (
        sims * _SIM[2] * t
        + judged * _REPLY["judge"]
        + explains * _REPLY["explain"]
        + x * _REPLY["decompose"]
        + _REPLY["cluster"]
        + refines * _REPLY["refine"]
    )
    return requests, prompt, reply


def estimate(
    records: Sequence[NeuronRecord],
    *,
    rounds: int,
    patience: int = 2,
    modes_high: int = 3,
    n_exemplars: int = 6,
) -> Estimate:
    """The (low, high) requests and tokens explaining ``records`` takes (see the module docstring)."""
    total = Estimate(0, (0, 0), (0, 0), (0, 0))
    for record in records:
        low = _neuron(record, rounds, patience, 1, False, n_exemplars)
        high = _neuron(record, rounds, patience, modes_high, True, n_exemplars)
        total += Estimate(
            1,
            (round(low[0]), round(high[0])),
            (round(low[1]), round(high[1])),
            (round(low[2]), round(high[2])),
        )
    return total


def cost(prompt_tokens: float, completion_tokens: float, prices: tuple[float, float]) -> float:
    """The price of the tokens at ``prices`` (input, output) per million tokens."""
    return (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6


def _span(pair: tuple[int, int]) -> str:
    return f"{pair[0]:,}" if pair[0] == pair[1] else f"{pair[0]:,}-{pair[1]:,}"


def estimate_line(est: Estimate, prices: tuple[float, float] | None) -> str:
    """One line saying what the LLM work ahead will take, as the estimate it is."""
    per = (est.requests[0] // max(est.neurons, 1), est.requests[1] // max(est.neurons, 1))
    line = (
        f"estimate (from the pools and rounds, not a count): {_span(est.requests)} LLM requests "
        f"for {est.neurons} neurons ({_span(per)} each), {_span(est.prompt_tokens)} prompt + "
        f"{_span(est.completion_tokens)} completion tokens"
    )
    if prices is not None:
        low = cost(est.prompt_tokens[0], est.completion_tokens[0], prices)
        high = cost(est.prompt_tokens[1], est.completion_tokens[1], prices)
        line += f", ${low:,.2f}-${high:,.2f}"
    return line + "; cached replies are free"


def measured_line(stats: LLMStats, seconds: float, prices: tuple[float, float] | None) -> str:
    """One line saying what the LLM work took: requests, tokens (the server's count, or an
    estimate where it sent none, said so), failed tries, time, and the price when given."""
    tokens = stats.prompt_tokens + stats.completion_tokens
    counted = (
        "as the server counted them"
        if stats.estimated_requests == 0
        else f"{stats.estimated_requests:,} replies without usage counted as characters / 4"
    )
    line = (
        f"measured: {stats.requests:,} LLM requests ({stats.cache_hits:,} steps from the cache, "
        f"{stats.failures} failed tries) in {seconds:.0f} s, {stats.requests / max(seconds, 1e-9):.1f}"
        f" requests/s; {stats.prompt_tokens:,} prompt + {stats.completion_tokens:,} completion "
        f"tokens ({counted}), {tokens / max(seconds, 1e-9):,.0f} tokens/s"
    )
    if prices is not None:
        line += f"; cost ${cost(stats.prompt_tokens, stats.completion_tokens, prices):,.4f}"
    return line

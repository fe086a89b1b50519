"""What masking a neuron's range does to the next-token distribution, for the atlas and exports.

For a decoder run each salient neuron's page shows the shift caused by masking *that neuron's
range*: the headline range map's range of the concept the neuron is most salient for (lowest
salience rank; ties: higher ranking score), masked as the run's erasure masks (its replacement,
positions, mode and scale; ``zero`` / ``all`` / ``hard`` without an erasure stage), on up to
``N_TEXTS`` texts of the run's test split, which the headline ranges were not fitted on
(interleaved across concepts, the first ``MAX_LENGTH`` tokens of each). Shown: the tokens whose
average probability rises and falls most, the total variation and the KL divergence KL(base ‖
edited) between the base and edited average distributions, the share of held-out tokens on which the
neuron lies in the range, and as a reference the same neuron's whole-neuron mask
(:class:`~rangelens.intervene.NeuronMask`), so range against neuron is visible.

Computed when the atlas is built (or a run exported), together with the output side and under its
switch (:mod:`rangelens.report.output_side`: it needs the same model load), not stored by a stage:
it reads only the capture and ranges stages, only the pages show it, and its size is bounded by
``N_TEXTS`` x ``MAX_LENGTH`` tokens; a stage would add a fingerprinted directory and reruns for a view.

The forwards are in :mod:`rangelens.report.shift_forwards` (this module imports no torch, so the
CLI and the atlas import quickly). Each neuron costs two suffix forwards over the texts, so only
``N_NEURONS`` pages get a shift (the explained neurons, then the most salient, round-robin over
concepts); the others say so, and :func:`rangelens.intervene.logits.next_token_shift` gives it for
any mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rangelens.ranges.maps import RangeMap
from rangelens.ranges.stats import ConceptStats

N_TEXTS, MAX_LENGTH = 16, 32
N_NEURONS = 16  # pages with a shift: the explained neurons, then the most salient (round-robin)
MASK_OPTIONS = ("replacement", "positions", "mode", "scale")
DEFAULT_MASK: dict[str, Any] = {
    "replacement": "zero",
    "positions": "all",
    "mode": "hard",
    "scale": 0.0,
}


@dataclass(frozen=True)
class ShiftTarget:
    """A neuron's range to mask: concept row ``concept`` and salience rank ``rank`` (its column)."""

    neuron: int
    concept: int
    rank: int


@dataclass
class ShiftPlan:
    """What the shifts are computed from: the headline map, the neurons' targets, the held-out texts
    (``source`` says which) and the mask options (``mask``; ``stats`` for mean replacements);
    ``skipped`` says why other salient neurons have none."""

    range_map: RangeMap
    targets: dict[int, ShiftTarget]
    texts: list[str]
    source: str
    mask: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MASK))
    stats: ConceptStats | None = None
    skipped: str | None = None

    @property
    def tau(self) -> float | None:
        tau = self.range_map.metadata.get("tau")
        return None if tau is None else float(tau)


@dataclass(frozen=True)
class TokenChange:
    """One token's average next-token probability without and with the mask."""

    token: str
    base: float
    edited: float

    @property
    def delta(self) -> float:
        return self.edited - self.base


@dataclass
class Shift:
    """The change one mask causes: the ``k`` tokens up and down most, the total variation of the
    average distributions and their KL divergence KL(base ‖ edited) in nats."""

    up: list[TokenChange]
    down: list[TokenChange]
    total_variation: float
    kl: float


@dataclass
class NeuronShift:
    """A neuron page's next-token shift: its range mask (``range``), the whole-neuron mask
    (``neuron``), the range masked (``concept``, salience ``rank``, ``band`` intervals), the share
    of the held-out tokens (``positions`` of them) on which the neuron lies in the range
    (``in_range``)."""

    concept: str
    rank: int
    band: list[tuple[float, float]]
    in_range: float
    positions: int
    range: Shift
    neuron: Shift

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: the fields, each shift's tokens as ``{token, base, edited}``."""
        return asdict(self)


def choose_targets(
    range_map: RangeMap, scores: np.ndarray | None, neurons: Sequence[int]
) -> dict[int, ShiftTarget]:
    """For each salient one of ``neurons``, the concept it is most salient for (lowest rank, ties:
    higher score in ``scores`` ``(C, d)``) and its rank there."""
    found: dict[int, list[tuple[int, float, int]]] = {}
    for c, row in enumerate(range_map.neurons):
        for r, j in enumerate(row.tolist()):
            score = float(scores[c, j]) if scores is not None else 0.0
            found.setdefault(int(j), []).append((r, -score, c))
    return {
        int(j): ShiftTarget(int(j), best[2], best[0])
        for j in neurons
        if int(j) in found
        for best in [min(found[int(j)])]
    }


def first_targets(
    range_map: RangeMap, targets: dict[int, ShiftTarget], first: Sequence[int], n: int = N_NEURONS
) -> dict[int, ShiftTarget]:
    """At most ``n`` of ``targets``: those of ``first`` (e.g. the explained neurons), then the
    most salient ones, rank by rank, round-robin over concepts."""
    order = [*first, *range_map.top_neurons(range_map.neurons.size)]
    picked: dict[int, ShiftTarget] = {}
    for j in order:
        if int(j) in targets and len(picked) < n:
            picked.setdefault(int(j), targets[int(j)])
    return picked


def held_out_rows(test: np.ndarray, labels: np.ndarray, n: int = N_TEXTS) -> list[int]:
    """Up to ``n`` test rows, taken in turn from each concept (each concept's rows in order)."""
    per = [test[labels[test] == c].tolist() for c in np.unique(labels[test])]
    rows: list[int] = []
    for i in range(max((len(p) for p in per), default=0)):
        rows += [p[i] for p in per if i < len(p)]
    return sorted(rows[:n])

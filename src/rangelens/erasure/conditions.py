"""The masked states the erasure experiment compares with the unmasked base.

A condition is a name and a function building its mask from a :class:`MaskSpec` (a concept's saved
:class:`~rangelens.ranges.maps.RangeMap` at one site, tau and p, and the replacement values). Adding a
condition is one :func:`register` call. ``per_tau`` says whether the mask changes with tau (range
masks) or only with the salient-neuron set, i.e. with p (neuron masks, the random control);
``per_ratio`` marks a mask built from the density bands (:mod:`rangelens.ranges.bands`) at each saved
likelihood ratio, which the experiment hands over in ``MaskSpec.bands``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rangelens.errors import RangelensError
from rangelens.ranges.maps import RangeMap

if TYPE_CHECKING:  # the masks (torch) load when a condition builds one
    from rangelens.activations.sites import NeuronSite
    from rangelens.intervene import Edit, LeaceEdit, RangeMask


@dataclass(frozen=True)
class MaskSpec:
    """What a condition's mask is built from: ``concept``'s row of ``range_map`` at ``site``;
    ``replacement`` ``(site.width,)`` per-neuron values; ``seed`` for conditions that draw."""

    site: NeuronSite
    range_map: RangeMap
    concept: int
    replacement: np.ndarray
    positions: str
    mode: str
    scale: float
    seed: tuple[int, ...]
    bands: RangeMap | None = None  # density bands on the same neurons (per_ratio conditions)
    features: np.ndarray | None = None  # (n, width) pooled training-row features (fitted edits)
    labels: np.ndarray | None = None  # (n,) their classes

    def options(self) -> dict[str, Any]:
        return {"positions": self.positions, "mode": self.mode, "scale": self.scale}


@dataclass(frozen=True)
class Condition:
    name: str
    build: Callable[[MaskSpec], Edit]
    per_tau: bool
    description: str
    per_ratio: bool = False


CONDITIONS: dict[str, Condition] = {}


def register(condition: Condition) -> Condition:
    CONDITIONS[condition.name] = condition
    return condition


def _range(spec: MaskSpec) -> RangeMask:
    from rangelens.intervene import RangeMask

    return RangeMask.from_range_map(
        spec.site, spec.range_map, spec.concept, replacement=spec.replacement, **spec.options()
    )


def _neuron(spec: MaskSpec) -> RangeMask:
    from rangelens.intervene import NeuronMask

    return NeuronMask.from_range_map(
        spec.site, spec.range_map, spec.concept, replacement=spec.replacement, **spec.options()
    )


def _density(spec: MaskSpec) -> RangeMask:
    if spec.bands is None:
        raise RangelensError(
            "condition 'density' needs density bands from the ranges stage; run it through "
            "rangelens run (or fit_rangeset with ratios)"
        )
    from rangelens.intervene import RangeMask

    return RangeMask.from_range_map(
        spec.site, spec.bands, spec.concept, replacement=spec.replacement, **spec.options()
    )


def random_neurons(spec: MaskSpec) -> np.ndarray:
    """As many neurons as the concept has salient ones, drawn uniformly without replacement."""
    k = spec.range_map.neurons.shape[1]
    rng = np.random.default_rng(list(spec.seed))
    return np.sort(rng.choice(spec.site.width, size=k, replace=False))


def _random(spec: MaskSpec) -> RangeMask:
    from rangelens.intervene import NeuronMask

    neurons = random_neurons(spec)
    return NeuronMask(spec.site, neurons, replacement=spec.replacement[neurons], **spec.options())


def _leace(spec: MaskSpec) -> LeaceEdit:
    if spec.features is None or spec.labels is None:
        raise RangelensError(
            f"condition 'leace' is fitted on pooled training features at site {spec.site.name}, "
            f"and none are cached there; use the analysis site and position (last, first or cls) "
            f"as the mask site, or the head site (erasure.head_site / head_layer)"
        )
    from rangelens.intervene import LeaceEdit

    return LeaceEdit.fit(spec.site, spec.features, spec.labels == spec.concept, spec.positions)


register(
    Condition("range", _range, True, "salient neurons replaced only inside the concept's range")
)
register(
    Condition("neuron", _neuron, False, "the same salient neurons replaced whatever their value")
)
register(
    Condition(
        "density",
        _density,
        False,
        "the same salient neurons replaced only where the concept is more likely than the other "
        "concepts (likelihood ratio above density_ratio; beyond NeuronLens)",
        per_ratio=True,
    )
)
register(
    Condition(
        "leace",
        _leace,
        False,
        "LEACE (Belrose et al. 2023, EleutherAI concept-erasure): the least-squares affine edit "
        "after which no linear probe of the site's pooled training features predicts concept vs "
        "rest; fitted per fold, applied at every masked position",
    )
)
register(
    Condition(
        "random",
        _random,
        False,
        "control: as many randomly drawn neurons, replaced whatever their value",
    )
)

"""The density mask: range masking over the values where a concept is more likely than the others
(:func:`rangelens.ranges.bands.density_bands`), on a range map's salient neurons."""

from __future__ import annotations

from typing import Any

import numpy as np

from rangelens.activations.sites import NeuronSite
from rangelens.intervene.masks import RangeMask
from rangelens.ranges.bands import density_bands
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.stats import ConceptStats


def density_map(range_map: RangeMap, stats: ConceptStats, ratio: float = 1.0) -> RangeMap:
    """``range_map``'s neurons with density bands at likelihood ratio ``ratio`` as their ranges."""
    band_lo, band_hi = density_bands(stats, range_map.neurons, ratio)
    with np.errstate(all="ignore"):
        lo = np.where(np.isnan(band_lo).all(-1), np.nan, np.nanmin(band_lo, axis=-1))
        hi = np.where(np.isnan(band_hi).all(-1), np.nan, np.nanmax(band_hi, axis=-1))
    return RangeMap(
        concepts=list(range_map.concepts),
        neurons=range_map.neurons.copy(),
        lo=lo,
        hi=hi,
        mean=range_map.mean.copy(),
        std=range_map.std.copy(),
        metadata={**range_map.metadata, "method": "density", "density_ratio": float(ratio)},
        band_lo=band_lo,
        band_hi=band_hi,
    )


def density_mask(
    site: NeuronSite,
    range_map: RangeMap,
    stats: ConceptStats,
    concepts: str | int | list[str | int],
    *,
    ratio: float = 1.0,
    **options: Any,
) -> RangeMask:
    """A :class:`RangeMask` over ``concepts``' density bands (beyond NeuronLens): a neuron is
    replaced only where the concept is at least ``ratio`` times as likely as the other concepts
    (``stats``: the run's statistics at ``site``). ``options`` as :meth:`RangeMask.from_range_map`
    (``replacement``, ``positions``, ...)::

        mask = density_mask(site, result.range_map, result.capture.stats, "sports")
    """
    bands = density_map(range_map, stats, ratio)
    return RangeMask.from_range_map(site, bands, concepts, stats=stats, **options)

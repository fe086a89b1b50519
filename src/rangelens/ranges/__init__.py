"""Activations -> statistics -> ranges: streaming per-concept statistics, neuron rankings, the
per-concept ranges (NeuronLens) and density bands, and the set of range maps a run fits."""

from rangelens.ranges.maps import ConceptRange, RangeMap
from rangelens.ranges.rangeset import RangeSet

__all__ = ["ConceptRange", "RangeMap", "RangeSet"]

"""The one error type users see: a one-line message naming the bad value and what would be valid."""

from collections.abc import Iterable


class RangelensError(ValueError):
    """Bad user input (model, dataset, site, option) detected before any output is written."""


def choices(values: Iterable[object]) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(v) for v in values)

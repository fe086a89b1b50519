"""The one error type users see: a one-line message naming the bad value and what would be valid."""

import unicodedata
from collections.abc import Iterable

from rich.markup import escape


class RangelensError(ValueError):
    """Bad user input (model, dataset, site, option) detected before any output is written."""


def choices(values: Iterable[object]) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(v) for v in values)


def terminal_text(value: object) -> str:
    """User text (a label) for a terminal table: control, bidirectional-formatting and other
    invisible format characters shown escaped (U+202E as ``\\u202e``, a tab as ``\\t``) so they
    cannot reorder or break the line, and ``[`` escaped so it is not read as rich markup. Zero-width
    joiners (emoji sequences) are kept."""
    text = "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch not in "\u200c\u200d"
        else ch
        for ch in str(value)
    )
    return escape(text)

"""The one error type users see: a one-line message naming the bad value and what would be valid."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


class RangelensError(ValueError):
    """Bad user input (model, dataset, site, option) detected before any output is written."""


def choices(values: Iterable[object]) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(v) for v in values)


def shown(value: object) -> str:
    """A bad value as the user typed it: command-line numbers bare, anything else repr'd."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?(e[-+]?\d+)?", value):
        return value
    return repr(value)


def location(error: Mapping[str, Any]) -> str:
    """Where a pydantic error is, as a user spells it: ``erasure.conditions[1]`` ("" at the top)."""
    where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in error["loc"])
    return where.lstrip(".")


def one_line(err: Exception, fields: Iterable[str] = ()) -> str:
    """An error as one line naming the option, the value and the problem. For a pydantic
    ``ValidationError`` the first error's location and input; an unknown key lists ``fields``."""
    errors = getattr(err, "errors", None)
    if callable(errors) and type(err).__name__ == "ValidationError":
        first: dict[str, Any] = errors()[0]
        where = location(first) or "config"
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, RangelensError):  # a nested model already said it in one line
            return str(cause)
        msg = str(first["msg"]).removeprefix("Value error, ")
        if msg.startswith("invalid "):  # a nested model already named the option and value
            return msg
        if first["type"] == "literal_error":
            if re.search(r"\[\d+\]$", where):  # one item of a list option: name it singular
                where = re.sub(r"\[\d+\]$", "", where).removesuffix("s")
            expected = str(first.get("ctx", {}).get("expected", "")).replace(" or ", ", ")
            return f"unknown {where} {shown(first.get('input'))}; valid: {expected}"
        valid = list(fields)
        if first["type"] == "extra_forbidden" and valid:
            return f"unknown option {where!r}; valid: {choices(valid)}"
        return f"invalid {where} ({shown(first.get('input'))}): {msg}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__

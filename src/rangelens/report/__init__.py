"""Reports of a run directory: the static neuron atlas (:func:`build_atlas`), its figures, and a
read-only local server for it (:func:`serve`).

The names below load on first use, so the CLI can register ``report`` / ``serve`` without importing
the analysis stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rangelens.report.atlas import build_atlas
    from rangelens.report.server import make_server, serve

__all__ = ["build_atlas", "make_server", "serve"]
_HOMES = {"build_atlas": "atlas", "make_server": "server", "serve": "server"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"rangelens.report.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

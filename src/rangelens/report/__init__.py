"""Reports of a run directory: the static neuron atlas (:func:`build_atlas`), its figures, and a
read-only local server for it (:func:`serve`).

The names below load on first use, so the CLI can register ``report`` / ``serve`` without importing
the analysis stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rangelens.lazy import lazy_members

if TYPE_CHECKING:
    from rangelens.report.atlas import build_atlas
    from rangelens.report.server import make_server, serve

__all__ = ["build_atlas", "make_server", "serve"]
_HOMES = {
    "build_atlas": "rangelens.report.atlas",
    "make_server": "rangelens.report.server",
    "serve": "rangelens.report.server",
}


__getattr__ = lazy_members(__name__, _HOMES)

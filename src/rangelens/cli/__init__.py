"""The ``rangelens`` command line (``rangelens.cli:app``)."""

from rangelens.cli.app import app

__all__ = ["app"]

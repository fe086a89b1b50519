"""``python -m rangelens.cli``: the same command line (e.g. under ``torchrun``)."""

from rangelens.cli.app import app

app()

"""The tutorial notebook runs end to end on the embedded default (small sizes), in CI."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "tutorial.ipynb"


@pytest.mark.integration
def test_tutorial_notebook_runs(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"tutorial notebook: {seconds:.0f} s")
    keep = os.environ.get("RANGELENS_NOTEBOOK_OUT")  # to read the executed notebook
    if keep:
        nbformat.write(notebook, keep)
    assert (tmp_path / "runs" / "tutorial" / "atlas" / "index.html").is_file()
    outputs = "".join(
        str(o.get("text", "")) for cell in notebook.cells for o in cell.get("outputs", [])
    )
    assert "tutorial ran in" in outputs

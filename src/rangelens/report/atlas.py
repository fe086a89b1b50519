"""The neuron atlas: a self-contained static site for one run directory.

``RUN_DIR/atlas/`` (written atomically) holds ``index.html`` (the run, what is missing, headline
numbers), ``concepts.html``, ``neurons.html`` (a searchable, sortable table of the salient neurons),
``neurons/<j>.html`` (ranges per concept, histograms, modes with explanations and scores,
exemplars), ``erasure.html``, ``explanations.html``, ``figures/`` (SVG + PNG) and ``static/`` (one
CSS and one JS file). Pages reference only relative paths, so the site works from ``file://`` and
offline; templates autoescape everything, so exemplar text and LLM explanations render as text.
``atlas.json`` records the build (format ``rangelens.atlas/1``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from rangelens.artifacts import ATLAS, atomic_dir, check_output_dir, read_json, write_json
from rangelens.report.contents import (
    default_explanations,
    load_run,
    page_neurons,
    shift_plan,
    source_fingerprint,
)
from rangelens.report.output_side import compute_output_side
from rangelens.report.site import Site
from rangelens.rundir import RunDir, run_root

ATLAS_FORMAT = "rangelens.atlas/1"


def atlas_is_current(run_dir: Path, out_dir: Path, explanations: Path | None = None) -> bool:
    """Whether ``out_dir`` holds an atlas built from ``run_dir``'s current contents."""
    manifest = out_dir / "atlas.json"
    if not (manifest.is_file() and (out_dir / "index.html").is_file()):
        return False
    expected = source_fingerprint(run_dir, explanations or default_explanations(run_dir))
    return bool(read_json(manifest).get("source") == expected)


def build_atlas(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    explanations: str | Path | None = None,
    force: bool = False,
    output_side: str = "auto",
) -> Path:
    """Write the atlas of ``run_dir`` to ``out_dir`` (default ``RUN_DIR/atlas``); return it.

    Renders whatever stages exist and lists the missing ones on the overview page. Explanations are
    read from ``explanations`` (default ``RUN_DIR/explanations``). An existing ``out_dir`` is
    replaced only if it is an atlas or empty (``force``: also explanations, but never a stage or
    anything inside a run; see :func:`rangelens.artifacts.check_output_dir`). ``output_side``
    (``auto`` / ``on`` / ``off``): whether each neuron page shows the tokens the neuron promotes
    and suppresses and what masking its range does to the next-token distribution on held-out
    text, which loads the model (``auto``: only when cheap; see
    :mod:`rangelens.report.output_side` and :mod:`rangelens.report.token_shift`). An export folder (``rangelens export``) is read as the
    run it holds::

        build_atlas("runs/demo")            # runs/demo/atlas/index.html
    """
    start = time.perf_counter()
    run_path = run_root(Path(run_dir))
    RunDir(run_path).require()
    out = Path(out_dir) if out_dir is not None else RunDir(run_path).atlas
    explained = Path(explanations) if explanations is not None else default_explanations(run_path)
    check_output_dir(out, ATLAS, force=force, keep=[run_path])
    run = load_run(run_path, explained)
    plan = shift_plan(run) if output_side != "off" else None
    run.output_side = compute_output_side(
        run.config, page_neurons(run), mode=output_side, shifts=plan
    )
    with atomic_dir(out, ATLAS, force=force, keep=[run_path]) as tmp:
        pages = Site(run, tmp).render()
        write_json(
            tmp / "atlas.json",
            {
                "format": ATLAS_FORMAT,
                "run_dir": str(run_path.resolve()),
                "source": source_fingerprint(run_path, explained),
                "rangelens": metadata.version("rangelens"),
                "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - start, 2),
                "pages": pages,
                "missing": run.missing,
            },
        )
    return out

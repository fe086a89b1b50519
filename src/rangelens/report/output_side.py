"""The output side of a run's neurons for the atlas and exports: the tokens each neuron promotes and
suppresses through the final norm and the unembedding (:func:`rangelens.intervene.logits.neuron_logits`).

Computed when the atlas is built (or a run exported), not stored by a stage: it needs only the
model's weights, no forward pass, and takes well under a second for hundreds of neurons. With
``output_side="auto"`` the model is loaded only when that is cheap: a built-in, or a local folder
or file whose weights total at most ``CHEAP_BYTES``; ``"on"`` loads any model (a hub id too),
``"off"`` never. Encoders have no unembedding and get no output side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rangelens.assets import BUILTIN_MODELS
from rangelens.errors import RangelensError, choices

OUTPUT_SIDE = ("auto", "on", "off")
CHEAP_BYTES = 2 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass
class OutputSide:
    """Top promoted / suppressed tokens per neuron (``(token, logit)`` pairs), or why there are
    none (``note``)."""

    tokens: dict[int, dict[str, list[tuple[str, float]]]] = field(default_factory=dict)
    note: str | None = None

    def of(self, neuron: int) -> dict[str, list[tuple[str, float]]] | None:
        return self.tokens.get(int(neuron))


def weights_bytes(model: str) -> int | None:
    """Total size of a local model's weight files (None for a hub id or an unknown path)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES)
    return None


def is_cheap(model: str) -> bool:
    """Whether loading ``model`` for its unembedding is cheap (see the module docstring)."""
    if model in BUILTIN_MODELS:
        return True
    size = weights_bytes(model)
    return size is not None and size <= CHEAP_BYTES


def compute_output_side(
    config: dict[str, Any], neurons: Sequence[int], *, mode: str = "auto", k: int = 10
) -> OutputSide:
    """The output side of ``neurons`` at the site of a run's ``config`` (``model``, ``site``,
    ``layer``, ``kind``); never raises for a model that cannot be read: the note says why."""
    if mode not in OUTPUT_SIDE:
        raise RangelensError(f"unknown output_side {mode!r}; valid: {choices(OUTPUT_SIDE)}")
    model = str(config.get("model", ""))
    if mode == "off" or not neurons:
        return OutputSide(note="not computed (output_side off)" if mode == "off" else None)
    builtin = BUILTIN_MODELS.get(model)
    if builtin is not None and builtin.kind != "decoder":
        return OutputSide(note="an encoder has no unembedding: no output side")
    if mode == "auto" and not is_cheap(model):
        return OutputSide(
            note=f"not computed: model {model!r} is not cheap to load (use output_side 'on')"
        )
    from rangelens.activations.models import load_model
    from rangelens.activations.sites import resolve_site
    from rangelens.intervene.logits import neuron_logits

    try:
        lm = load_model(model)
        if lm.kind != "decoder":
            return OutputSide(note="an encoder has no unembedding: no output side")
        site = resolve_site(lm.model, str(config.get("site", "resid")), config.get("layer", -1))
        frame = neuron_logits(lm, site, [int(j) for j in neurons], k=k)
    except (RangelensError, OSError, ValueError) as err:
        return OutputSide(note=f"not computed: {str(err).splitlines()[0]}")
    out: dict[int, dict[str, list[tuple[str, float]]]] = {}
    for row in frame.itertuples():
        sides = out.setdefault(int(row.neuron), {"promoted": [], "suppressed": []})
        sides[str(row.side)].append((str(row.token), float(row.logit)))
    return OutputSide(out)

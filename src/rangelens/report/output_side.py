"""The output side of a run's neurons for the atlas and exports: the tokens each neuron promotes and
suppresses through the final norm and the unembedding (:func:`rangelens.intervene.logits.neuron_logits`),
and what masking each neuron's range does to the next-token distribution on held-out text
(:mod:`rangelens.report.token_shift`, from the same model load).

Computed when the atlas is built (or a run exported), not stored by a stage: it needs only the
model's weights, no forward pass, and takes well under a second for hundreds of neurons (the
next-token shift needs forwards, bounded as :mod:`~rangelens.report.token_shift` says). With
``output_side="auto"`` the model is loaded only when that is cheap: a built-in, or a local folder
or file whose weights total at most ``CHEAP_BYTES``; ``"on"`` loads any model (a hub id too),
``"off"`` never. Encoders have no unembedding nor next-token distribution and get neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rangelens.assets import BUILTIN_MODELS
from rangelens.errors import RangelensError, choices
from rangelens.report.token_shift import NeuronShift, ShiftPlan

OUTPUT_SIDE = ("auto", "on", "off")
CHEAP_BYTES = 2 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


ENCODER_NOTE = (
    "an encoder has no unembedding and no next-token distribution: no output side and no "
    "next-token shift"
)


@dataclass
class OutputSide:
    """Top promoted / suppressed tokens per neuron (``(token, logit)`` pairs), or why there are
    none (``note``); the next-token shift of each neuron's range mask (``shifts``), what it was
    computed on (``shift_about``: ``texts``, ``tau``, ``mask``) or why there is none
    (``shift_note``; ``note`` covers both when the model was not loaded; ``shift_skipped``: why a
    salient neuron left out of the plan has none)."""

    tokens: dict[int, dict[str, list[tuple[str, float]]]] = field(default_factory=dict)
    note: str | None = None
    shifts: dict[int, NeuronShift] = field(default_factory=dict)
    shift_note: str | None = None
    shift_about: dict[str, Any] = field(default_factory=dict)
    shift_skipped: str | None = None

    def of(self, neuron: int) -> dict[str, list[tuple[str, float]]] | None:
        return self.tokens.get(int(neuron))

    def shift_of(self, neuron: int) -> NeuronShift | None:
        return self.shifts.get(int(neuron))


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
    config: dict[str, Any],
    neurons: Sequence[int],
    *,
    mode: str = "auto",
    k: int = 10,
    shifts: ShiftPlan | str | None = None,
) -> OutputSide:
    """The output side of ``neurons`` at the site of a run's ``config`` (``model``, ``site``,
    ``layer``, ``kind``) and, given a plan, the next-token shift of the plan's range masks
    (``shifts``: a plan, or why there is none); never raises for a model that cannot be read: the
    notes say why."""
    if mode not in OUTPUT_SIDE:
        raise RangelensError(f"unknown output_side {mode!r}; valid: {choices(OUTPUT_SIDE)}")
    model = str(config.get("model", ""))
    if mode == "off" or not neurons:
        return OutputSide(note="not computed (output_side off)" if mode == "off" else None)
    builtin = BUILTIN_MODELS.get(model)
    if builtin is not None and builtin.kind != "decoder":
        return OutputSide(note=ENCODER_NOTE)
    if mode == "auto" and not is_cheap(model):
        return OutputSide(
            note=f"not computed: model {model!r} is not cheap to load (use output_side 'on')"
        )
    from rangelens.activations.models import load_model
    from rangelens.activations.sites import resolve_site
    from rangelens.intervene.logits import neuron_logits
    from rangelens.report.shift_forwards import range_shifts

    try:
        lm = load_model(model)
        if lm.kind != "decoder":
            return OutputSide(note=ENCODER_NOTE)
        site = resolve_site(lm.model, str(config.get("site", "resid")), config.get("layer", -1))
    except (RangelensError, OSError, ValueError) as err:
        return OutputSide(note=f"not computed: {_first_line(err)}")
    side = OutputSide()
    try:
        frame = neuron_logits(lm, site, [int(j) for j in neurons], k=k)
    except (RangelensError, OSError, ValueError) as err:
        side.note = f"not computed: {_first_line(err)}"
    else:
        for row in frame.itertuples():
            sides = side.tokens.setdefault(int(row.neuron), {"promoted": [], "suppressed": []})
            sides[str(row.side)].append((str(row.token), float(row.logit)))
    if not isinstance(shifts, ShiftPlan):
        side.shift_note = shifts
        return side
    try:
        side.shifts = range_shifts(lm, site, shifts, k=k)
        side.shift_about = {"texts": shifts.source, "tau": shifts.tau, "mask": dict(shifts.mask)}
        side.shift_skipped = shifts.skipped
    except (RangelensError, OSError, ValueError) as err:
        side.shift_note = f"not computed: {_first_line(err)}"
    return side


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__

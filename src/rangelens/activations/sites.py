"""Named recording sites on stock `transformers` models (a small declarative registry, TL-style).

A site is where a "neuron" lives: ``resid`` (a block's output, the NeuronLens site), ``mlp`` (MLP neurons:
the input of the down-projection, i.e. after the activation function), ``attn`` (the attention output
projection, before the residual add), or ``module:<dotted.path>`` for any module's output
(``module:<dotted.path>:input`` for its input); a module site's width is read from its first tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rangelens.activations.hooks import Trace, get_module, stop_forward
from rangelens.activations.models import input_device
from rangelens.errors import RangelensError, choices

SITE_KINDS = ("resid", "mlp", "attn")
HookKind = Literal["output", "input"]


@dataclass(frozen=True)
class Family:
    """Where an architecture family keeps its blocks and, inside a block, its MLP and attention.

    Paths are relative to the bare base model (``model.base_model``), so the same entry serves the
    bare model and its task wrappers (``*ForCausalLM``, ``*ForSequenceClassification``, ...).
    """

    layers: str  # the block ModuleList
    mlp: str  # module whose *input* holds the MLP neurons (after the activation function)
    attn: str  # module whose *output* is the attention output projection (before the residual add)
    final_norm: str | None = None  # norm applied after the last block (decoders)


_LLAMA = Family("layers", "mlp.down_proj", "self_attn.o_proj", "norm")
_BERT = Family("encoder.layer", "output.dense", "attention.output.dense")
# Every entry is covered by the family-parity test (tests/test_families.py).
FAMILIES: dict[str, Family] = {
    **{
        t: _LLAMA
        for t in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "olmo3",
            "stablelm",
            "cohere",
            "granite",
            "smollm3",
        )
    },
    "phi": Family("layers", "mlp.fc2", "self_attn.dense", "final_layernorm"),
    "starcoder2": Family("layers", "mlp.c_proj", "self_attn.o_proj", "norm"),
    "gpt2": Family("h", "mlp.c_proj", "attn.c_proj", "ln_f"),
    "gptj": Family("h", "mlp.fc_out", "attn.out_proj", "ln_f"),
    "gpt_neox": Family("layers", "mlp.dense_4h_to_h", "attention.dense", "final_layer_norm"),
    "falcon": Family("h", "mlp.dense_4h_to_h", "self_attention.dense", "ln_f"),
    "bloom": Family("h", "mlp.dense_4h_to_h", "self_attention.dense", "ln_f"),
    "opt": Family("decoder.layers", "fc2", "self_attn.out_proj", "decoder.final_layer_norm"),
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta-v2")},
    "mpnet": Family("encoder.layer", "output.dense", "attention.attn.o"),
    "distilbert": Family("transformer.layer", "ffn.lin2", "attention.out_lin"),
}


@dataclass(frozen=True)
class NeuronSite:
    """A resolved site: the module to hook, whether its input or output holds the neurons, its layer."""

    kind: str  # resid | mlp | attn | module
    layer: int | None  # non-negative block index; None for a module outside the blocks
    module_path: str
    hook: HookKind
    width: int

    @property
    def name(self) -> str:
        if self.kind != "module":
            return f"{self.kind}.{self.layer}"
        return f"module:{self.module_path}" + (":input" if self.hook == "input" else "")


def _config(model: nn.Module) -> Any:
    """The `transformers` config of a model (typed loosely: configs differ per family)."""
    return getattr(model, "config", None)


def _model_type(model: nn.Module) -> str:
    return str(getattr(_config(model), "model_type", "?"))


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _base_prefix(model: nn.Module) -> str:
    """Path of the bare base model inside ``model`` ('' when ``model`` is the base model)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def family(model: nn.Module) -> Family | None:
    """The registry entry of the model's ``model_type`` (None if unmapped)."""
    return FAMILIES.get(_model_type(model))


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ModuleList of a model's transformer blocks (registry first, then a generic search)."""
    fam = family(model)
    if fam is not None:
        path = _base_prefix(model) + fam.layers
        found = _get(model, path)
        if isinstance(found, nn.ModuleList):
            return path, found
    n = getattr(_config(model), "num_hidden_layers", None)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n
    ]
    if not candidates:
        raise RangelensError(
            f"cannot find the transformer blocks of model type {_model_type(model)!r}; use a "
            f"'module:<dotted.path>' site"
        )
    return min(candidates, key=lambda c: c[0].count("."))


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a decoder applies after its last block (hidden_states[-1] includes it), if known."""
    fam = family(model)
    if fam is None or fam.final_norm is None:
        return None
    return _get(model, _base_prefix(model) + fam.final_norm)


def probe_width(model: nn.Module, path: str, hook: HookKind) -> int:
    """Width (last dimension) of the tensor at a module's input or output, read from a 2-token forward.

    One-line errors when the path is empty/unknown, the module does not run, or the value is not a
    tensor; the forward stops as soon as the module has fired.
    """
    vocab = int(getattr(_config(model), "vocab_size", 3) or 3)
    ids = torch.tensor([[min(2, vocab - 1), min(3, vocab - 1)]], device=input_device(model))
    trace = Trace(model, path, input=hook == "input", stop=True)
    with torch.inference_mode(), trace, stop_forward():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    if trace.value is None:
        raise RangelensError(
            f"module {path!r} did not run in a forward of the model; choose a module that does"
        )
    return int(trace.value.shape[-1])


def _width(model: nn.Module, module: nn.Module, path: str, hook: HookKind) -> int:
    """Neuron count at a Linear (or GPT-2 Conv1D) input/output, else read from a probe forward."""
    if isinstance(module, nn.Linear):
        return module.in_features if hook == "input" else module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2: weight is (in, out)
        return int(weight.shape[0] if hook == "input" else weight.shape[1])
    return probe_width(model, path, hook)


def _module_site(model: nn.Module, spec: str) -> NeuronSite:
    path = spec.removeprefix("module:")
    hook: HookKind = "output"
    if path.endswith(":input"):
        path, hook = path.removesuffix(":input"), "input"
    elif path.endswith(":output"):
        path = path.removesuffix(":output")
    module = get_module(model, path)
    return NeuronSite("module", None, path, hook, _width(model, module, path, hook))


def resolve_site(model: nn.Module, site: str, layer: int | None = None) -> NeuronSite:
    """Resolve a site name (``resid``/``mlp``/``attn`` with a layer, or ``module:<path>[:input]``).

    Negative layers count from the end, as in Python indexing.
    """
    if site.startswith("module:"):
        return _module_site(model, site)
    if site not in SITE_KINDS:
        raise RangelensError(
            f"unknown site {site!r}; valid: {choices(SITE_KINDS)} or 'module:<dotted.path>[:input]'"
        )
    prefix, layers = blocks(model)
    n = len(layers)
    if layer is None:
        layer = -1
    if not -n <= layer < n:
        raise RangelensError(
            f"layer {layer} out of range for a {n}-layer model; valid: {-n}..{n - 1}"
        )
    layer %= n
    if site == "resid":
        path = f"{prefix}.{layer}"
        hidden = getattr(_config(model), "hidden_size", None)
        width = int(hidden) if hidden else probe_width(model, path, "output")
        return NeuronSite("resid", layer, path, "output", width)
    fam = family(model)
    if fam is None:
        raise RangelensError(
            f"site {site!r} is not mapped for model type {_model_type(model)!r}; valid here: "
            f"'resid' or 'module:<dotted.path>[:input]' (mapped types: {choices(FAMILIES)})"
        )
    sub = fam.mlp if site == "mlp" else fam.attn
    path = f"{prefix}.{layer}.{sub}"
    module = _get(model, path)
    if module is None:
        raise RangelensError(
            f"site {site!r} ({path!r}) not found in this {_model_type(model)} model"
        )
    hook: HookKind = "input" if site == "mlp" else "output"
    return NeuronSite(site, layer, path, hook, _width(model, module, path, hook))

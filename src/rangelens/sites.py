"""Named recording sites on stock `transformers` models (a small declarative registry, TL-style).

A site is where a "neuron" lives: ``resid`` (a block's output, the NeuronLens site), ``mlp`` (MLP neurons:
the input of the down-projection, i.e. after the activation function), ``attn`` (the attention output
projection, before the residual add), or ``module:<dotted.path>`` for any module's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from rangelens.errors import RangelensError, choices

SITE_KINDS = ("resid", "mlp", "attn")
HookKind = Literal["output", "input"]


@dataclass(frozen=True)
class Family:
    """Where an architecture family keeps its blocks and, inside a block, its MLP and attention."""

    layers: tuple[str, ...]  # candidate paths of the block ModuleList (with/without a head wrapper)
    mlp: str  # module whose *input* holds the MLP neurons
    attn: str  # module whose *output* is the attention output
    final_norm: tuple[str, ...] = ()  # norm applied after the last block (decoders)


_LLAMA = Family(
    layers=("model.layers", "layers"),
    mlp="mlp.down_proj",
    attn="self_attn.o_proj",
    final_norm=("model.norm", "norm"),
)
FAMILIES: dict[str, Family] = {
    **{
        t: _LLAMA
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2")
    },
    "gpt2": Family(
        layers=("transformer.h", "h"),
        mlp="mlp.c_proj",
        attn="attn.c_proj",
        final_norm=("transformer.ln_f", "ln_f"),
    ),
    "gpt_neox": Family(
        layers=("gpt_neox.layers", "layers"),
        mlp="mlp.dense_4h_to_h",
        attn="attention.dense",
        final_norm=("gpt_neox.final_layer_norm", "final_layer_norm"),
    ),
    **{
        t: Family(
            layers=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
            mlp="output.dense",
            attn="attention.output.dense",
        )
        for t in ("bert", "roberta", "xlm-roberta", "electra")
    },
    "distilbert": Family(
        layers=("transformer.layer", "distilbert.transformer.layer"),
        mlp="ffn.lin2",
        attn="attention.out_lin",
    ),
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
        return (
            f"{self.kind}.{self.layer}" if self.kind != "module" else f"module:{self.module_path}"
        )


def _config(model: nn.Module) -> Any:
    """The `transformers` config of a model (typed loosely: configs differ per family)."""
    return getattr(model, "config", None)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ModuleList of a model's transformer blocks (registry first, then a generic search)."""
    family = FAMILIES.get(getattr(_config(model), "model_type", ""))
    for path in family.layers if family else ():
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
            f"cannot find the transformer blocks of model type "
            f"{getattr(_config(model), 'model_type', '?')!r}; use a 'module:<dotted.path>' site"
        )
    return min(candidates, key=lambda c: c[0].count("."))


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a decoder applies after its last block (hidden_states[-1] includes it), if known."""
    family = FAMILIES.get(getattr(_config(model), "model_type", ""))
    for path in family.final_norm if family else ():
        found = _get(model, path)
        if found is not None:
            return found
    return None


def _width(module: nn.Module, hook: HookKind, default: int) -> int:
    """Neuron count at a Linear (or GPT-2 Conv1D) input/output; ``default`` for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features if hook == "input" else module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2: weight is (in, out)
        return int(weight.shape[0] if hook == "input" else weight.shape[1])
    return default


def resolve_site(model: nn.Module, site: str, layer: int | None = None) -> NeuronSite:
    """Resolve a site name (``resid``/``mlp``/``attn`` with a layer, or ``module:<path>``).

    Negative layers count from the end, as in Python indexing.
    """
    hidden = int(_config(model).hidden_size)
    if site.startswith("module:"):
        path = site.removeprefix("module:")
        module = _get(model, path)
        if module is None:
            raise RangelensError(
                f"module {path!r} not found in the model; see model.named_modules()"
            )
        return NeuronSite("module", None, path, "output", _width(module, "output", hidden))
    if site not in SITE_KINDS:
        raise RangelensError(
            f"unknown site {site!r}; valid: {choices(SITE_KINDS)} or 'module:<dotted.path>'"
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
        return NeuronSite("resid", layer, f"{prefix}.{layer}", "output", hidden)
    family = FAMILIES.get(getattr(_config(model), "model_type", ""))
    if family is None:
        raise RangelensError(
            f"site {site!r} is not mapped for model type {_config(model).model_type!r}; valid here: "
            f"'resid' or 'module:<dotted.path>'"
        )
    sub = family.mlp if site == "mlp" else family.attn
    path = f"{prefix}.{layer}.{sub}"
    module = _get(model, path)
    if module is None:
        raise RangelensError(
            f"site {site!r} ({path!r}) not found in this {_config(model).model_type} model"
        )
    hook: HookKind = "input" if site == "mlp" else "output"
    return NeuronSite(site, layer, path, hook, _width(module, hook, hidden))

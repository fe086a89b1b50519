"""The hook primitive (rangelens.activations.hooks) and module sites built on it."""

from __future__ import annotations

import pytest
import torch

from rangelens.activations.capture import capture, model_inputs, tokenize
from rangelens.activations.hooks import Trace, TraceDict, stop_forward
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import resolve_site
from rangelens.errors import RangelensError


def forward(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    batch = tokenize(lm, texts, padding_side="left")[0]
    with torch.no_grad():
        return lm.model(**model_inputs(lm.model, batch)).logits


def test_trace_reads_input_and_output(tiny_llama: LoadedModel, texts: list[str]) -> None:
    down = tiny_llama.model.model.layers[1].mlp.down_proj
    with (
        Trace(tiny_llama.model, "model.layers.1.mlp.down_proj", input=True) as x,
        Trace(tiny_llama.model, "model.layers.1.mlp.down_proj") as y,
    ):
        forward(tiny_llama, texts)
    assert x.value is not None and y.value is not None
    torch.testing.assert_close(down(x.value), y.value)
    assert x.value.shape[-1] == tiny_llama.model.config.intermediate_size


def test_trace_edits_input_and_tuple_output(tiny_llama: LoadedModel, texts: list[str]) -> None:
    model = tiny_llama.model
    base = forward(tiny_llama, texts)
    with Trace(model, "model.layers.0.mlp.down_proj", input=True, edit=torch.zeros_like):
        no_mlp = forward(tiny_llama, texts)
    assert not torch.allclose(no_mlp, base)
    # Zeroing the MLP input equals zeroing the MLP's output (down_proj has no bias).
    with Trace(model, "model.layers.0.mlp", edit=torch.zeros_like):
        torch.testing.assert_close(forward(tiny_llama, texts), no_mlp)
    # A block's output (a tensor or tuple, per transformers version): edit element 0.
    with Trace(model, "model.layers.1", edit=lambda h: h * 0) as block:
        forward(tiny_llama, texts)
    assert block.value is not None and float(block.value.abs().max()) == 0.0
    torch.testing.assert_close(forward(tiny_llama, texts), base)  # hooks gone


def test_keyword_only_input() -> None:
    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(input=x)

    model = Wrap()
    x = torch.ones(1, 3)
    with Trace(model, "inner", input=True, edit=lambda t: t * 0) as tr:
        out = model(x)
    assert tr.value is not None and float(tr.value.abs().sum()) == 0.0
    torch.testing.assert_close(out, model.inner.bias[None])


def test_trace_dict_stops_after_all_fired(tiny_llama: LoadedModel, texts: list[str]) -> None:
    model = tiny_llama.model
    ran: list[int] = []
    handles = [
        layer.register_forward_hook(lambda *_a, i=i: ran.append(i))
        for i, layer in enumerate(model.model.layers)
    ]
    batch = tokenize(tiny_llama, texts)[0]
    try:
        points = {"a": ("model.layers.0", False), "b": ("model.layers.1.mlp.down_proj", True)}
        with TraceDict(model, points, stop=True) as traces, stop_forward():
            model(**model_inputs(model, batch))
    finally:
        for h in handles:
            h.remove()
    assert ran == [0] and traces["a"].value is not None and traces["b"].value is not None
    assert not model.model.layers[0]._forward_hooks


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ("module:", "empty module path"),
        ("module::input", "empty module path"),
        ("module:model.nope", "module 'model.nope' not found"),
        ("module:model", "output of module 'model' is a BaseModelOutputWithPast, not a tensor"),
        ("module:lm_head.nope:input", "module 'lm_head.nope' not found"),
    ],
)
def test_bad_module_sites(tiny_llama: LoadedModel, site: str, message: str) -> None:
    with pytest.raises(RangelensError, match=message):
        resolve_site(tiny_llama.model, site)
    assert not tiny_llama.model.model._forward_hooks  # the probe's hook was removed


def test_module_input_site_equals_mlp_site(tiny_llama: LoadedModel, texts: list[str]) -> None:
    model = tiny_llama.model
    mlp = resolve_site(model, "mlp", 1)
    module_in = resolve_site(model, "module:model.layers.1.mlp.down_proj:input")
    act = resolve_site(model, "module:model.layers.1.mlp.act_fn")  # not a Linear: width probed
    assert module_in.name == "module:model.layers.1.mlp.down_proj:input"
    assert module_in.width == act.width == model.config.intermediate_size
    acts = capture(tiny_llama, texts, [mlp, module_in, act], progress=False).acts
    torch.testing.assert_close(
        torch.from_numpy(acts[module_in.name]), torch.from_numpy(acts[mlp.name])
    )
    assert acts[act.name].shape == (len(texts), model.config.intermediate_size)


def test_an_edit_gets_the_forward_context(tiny_llama: LoadedModel, texts: list[str]) -> None:
    """With ``context=True`` the edit receives the model forward's arguments (positional ones by
    name), only while that forward runs, and the hooks on the model are removed on exit."""
    model = tiny_llama.model
    batch = tokenize(tiny_llama, texts, batch_size=len(texts))[0]
    seen: list[tuple[bool, torch.Tensor | None]] = []

    def edit(x: torch.Tensor, forward: object) -> torch.Tensor:
        seen.append((forward.active, forward.tensor("attention_mask")))  # type: ignore[attr-defined]
        return x

    path = resolve_site(model, "resid", 0).module_path
    before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with Trace(model, path, edit=edit, context=True) as trace:
        model(batch.input_ids, attention_mask=batch.attention_mask)  # keyword
        model(batch.input_ids, batch.attention_mask)  # positional
        assert trace.context is not None and not trace.context.active  # between forwards
    assert before == (len(model._forward_pre_hooks), len(model._forward_hooks))
    assert len(seen) == 2 and all(active for active, _ in seen)
    for _, mask in seen:
        assert mask is not None and torch.equal(mask, batch.attention_mask)


def test_hooks_are_registered_in_one_place() -> None:
    """Every hook rangelens registers goes through activations/hooks.py (one primitive)."""
    from pathlib import Path

    import rangelens

    root = Path(rangelens.__file__).parent
    outside = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "register_forward" in p.read_text() and p.name != "hooks.py"
    ]
    assert outside == []

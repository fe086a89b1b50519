"""Steering: the hook sets exactly the chosen neurons to the chosen values, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rangelens import RangeSteer, resolve_site
from rangelens.activations.hooks import Trace
from rangelens.errors import RangelensError
from rangelens.intervene.steer import DirectionSteer, generate
from rangelens.ranges.maps import RangeMap


@pytest.mark.parametrize("kind", ["resid", "mlp"])
def test_steer_sets_exactly_the_chosen_neurons(tiny_llama, texts, kind):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    site = resolve_site(model, kind, 1)
    ids = tok(texts[0], return_tensors="pt")
    is_input = site.hook == "input"
    with torch.no_grad(), Trace(model, site.module_path, input=is_input) as base:
        model(**ids)
    steer = RangeSteer(site, [2, 7, 11], [5.0, -3.5, 0.25])
    # A trace registered after the steer sees the value the steer left at the site.
    with (
        torch.no_grad(),
        steer.attach(model),
        Trace(model, site.module_path, input=is_input) as seen,
    ):
        model(**ids)
    before, after = base.value[0], seen.value[0]
    assert torch.equal(after[:, [2, 7, 11]], torch.tensor([5.0, -3.5, 0.25]).expand(len(after), 3))
    others = np.setdiff1d(np.arange(site.width), [2, 7, 11])
    assert torch.equal(after[:, others], before[:, others])
    # Removed on exit.
    with torch.no_grad(), Trace(model, site.module_path, input=is_input) as again:
        model(**ids)
    assert torch.equal(again.value, base.value)


def test_steer_from_range_map_uses_the_concept_mean_inside_its_range(tiny_llama):
    site = resolve_site(tiny_llama.model, "resid", 1)
    ranges = RangeMap(
        concepts=["a", "b"],
        neurons=np.array([[1, 4], [4, 9]]),
        lo=np.array([[-1.0, 0.0], [2.0, 3.0]]),
        hi=np.array([[1.0, 2.0], [4.0, 5.0]]),
        mean=np.array([[0.0, 1.0], [3.0, 6.0]]),  # 6.0 lies outside [3, 5]: clipped into it
        std=np.ones((2, 2)),
    )
    steer = RangeSteer.from_range_map(site, ranges, "b")
    assert steer.neurons.tolist() == [4, 9]
    assert steer.values.tolist() == [3.0, 5.0]
    with pytest.raises(RangelensError, match="unknown steering value"):
        RangeSteer.from_range_map(site, ranges, "b", value="max")
    with pytest.raises(RangelensError, match="needs stats"):
        RangeSteer.from_range_map(site, ranges, "b", value="quantile")


def test_steered_generation_differs_and_direction_steer_adds(tiny_llama):
    model = tiny_llama.model
    site = resolve_site(model, "resid", 2)
    prompts = ["The match", "Shares fell"]
    base = generate(tiny_llama, prompts, max_new_tokens=4)
    steered = generate(
        tiny_llama, prompts, steer=RangeSteer(site, range(8), 50.0), max_new_tokens=4
    )
    assert base != steered
    assert generate(tiny_llama, prompts, max_new_tokens=4) == base  # hooks removed
    vector = torch.arange(32, dtype=torch.float32)
    direction = DirectionSteer(site, vector, alpha=0.5)
    x = torch.zeros(1, 3, 32)
    assert torch.equal(direction.edit(x), 0.5 * vector.expand(1, 3, 32))


def test_steer_refuses_bad_neurons(tiny_llama):
    site = resolve_site(tiny_llama.model, "resid", 1)
    with pytest.raises(RangelensError, match="out of range"):
        RangeSteer(site, [40], [1.0])
    with pytest.raises(RangelensError, match="shape"):
        RangeSteer(site, [1, 2], [1.0, 2.0, 3.0])

"""The next-token shift of a neuron's range mask (the atlas's neuron pages), checked against a hand
computation: plain forwards of each text alone, with a plain torch hook zeroing the neuron's
in-range values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rangelens.activations.sites import resolve_site
from rangelens.ranges.maps import RangeMap
from rangelens.report.shift_forwards import range_shifts
from rangelens.report.token_shift import ShiftPlan, choose_targets, first_targets, held_out_rows


def _hand(lm, site, texts, edit=None):
    """Mean next-token distribution over every token of every text, each text run alone, with
    ``edit`` (values of the site -> new values) applied by a plain hook; and the site's values."""
    module = lm.model.get_submodule(site.module_path)
    seen = []

    def pre_hook(_m, args):
        x = args[0]
        seen.append(x[0].clone())
        return (edit(x), *args[1:]) if edit is not None else None

    def hook(_m, _args, out):
        x = out[0] if isinstance(out, tuple) else out
        seen.append(x[0].clone())
        if edit is None:
            return None
        return (edit(x), *out[1:]) if isinstance(out, tuple) else edit(x)

    probs = []
    if site.hook == "input":
        handle = module.register_forward_pre_hook(pre_hook)
    else:
        handle = module.register_forward_hook(hook)
    try:
        for t in texts:
            ids = lm.tokenizer(t, return_tensors="pt", truncation=True, max_length=16)
            with torch.no_grad():
                probs.append(torch.softmax(lm.model(**ids).logits[0].double(), -1))
    finally:
        handle.remove()
    return torch.cat(probs), torch.cat(seen)


@pytest.mark.parametrize(("kind", "layer"), [("mlp", 1), ("resid", 1), ("resid", 2)])
def test_shift_equals_a_hand_computation(tiny_llama, texts, kind, layer):
    lm = tiny_llama
    site = resolve_site(lm.model, kind, layer)
    base, values = _hand(lm, site, texts)
    j = 7
    lo, hi = np.quantile(values[:, j].numpy(), [0.3, 0.7])  # a range that fires on ~40% of tokens
    # Neuron j is salient for both concepts, with rank 1 for "a" and rank 0 for "b": masked for b.
    ranges = RangeMap(
        ["a", "b"],
        np.array([[3, j], [j, 11]]),
        np.array([[-1.0, -5.0], [lo, -1.0]]),
        np.array([[1.0, 5.0], [hi, 1.0]]),
        np.zeros((2, 2)),
        np.ones((2, 2)),
        metadata={"tau": 1.5},
    )
    targets = choose_targets(ranges, None, [j])
    assert (targets[j].concept, targets[j].rank) == (1, 0)
    # A replacement far from the values, so a random tiny model's shift stands above float noise.
    mask = {"replacement": 8.0, "positions": "all", "mode": "hard", "scale": 0.0}
    plan = ShiftPlan(ranges, targets, texts, "the fixture's texts", mask)
    got = range_shifts(lm, site, plan, k=5, batch_size=3, max_length=16)[j]

    def in_range(x):
        y = x.clone()
        inside = (x[..., j] >= lo) & (x[..., j] <= hi)
        y[..., j] = torch.where(inside, torch.full_like(x[..., j], 8.0), x[..., j])
        return y

    def whole(x):
        y = x.clone()
        y[..., j] = 8.0
        return y

    for edit, shift in ((in_range, got.range), (whole, got.neuron)):
        edited, _ = _hand(lm, site, texts, edit)
        p, q = base.mean(0), edited.mean(0)
        delta = q - p
        assert [c.base for c in shift.up] == pytest.approx(
            p[torch.topk(delta, 5).indices], rel=1e-4
        )
        assert [c.delta for c in shift.up] == pytest.approx(torch.topk(delta, 5).values, rel=1e-3)
        assert [c.delta for c in shift.down] == pytest.approx(
            -torch.topk(-delta, 5).values, rel=1e-3
        )
        assert [c.token for c in shift.up] == [
            lm.tokenizer.decode([t]) for t in torch.topk(delta, 5).indices.tolist()
        ]
        assert shift.total_variation == pytest.approx(float(delta.abs().sum() / 2), rel=1e-3)
        assert shift.kl == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-3)
    assert got.range.total_variation > 0  # the range fires, so the shift is not trivially zero
    share = float(((values[:, j] >= lo) & (values[:, j] <= hi)).double().mean())
    assert got.in_range == pytest.approx(share) and got.positions == len(values)
    assert (got.concept, got.rank, got.band) == ("b", 0, [(lo, hi)])


def test_a_range_that_never_fires_shifts_nothing(tiny_llama, texts):
    site = resolve_site(tiny_llama.model, "mlp", 0)
    ranges = RangeMap(
        ["a"], [[2]], [[1e6]], [[2e6]], [[0.0]], [[1.0]], metadata={"tau": 2.0}
    )  # far outside any activation
    plan = ShiftPlan(ranges, choose_targets(ranges, None, [2]), texts, "the fixture's texts")
    got = range_shifts(tiny_llama, site, plan, k=3, max_length=16)[2]
    assert got.in_range == 0 and got.range.total_variation == 0 and got.range.kl == 0
    assert got.neuron.total_variation > 0


def test_held_out_rows_take_each_concept_in_turn():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    test = np.array([1, 2, 3, 5, 7, 8])
    assert held_out_rows(test, labels, 4) == [1, 2, 5, 7]
    assert held_out_rows(test, labels, 100) == test.tolist()


def test_first_targets_take_the_given_neurons_then_the_most_salient():
    ranges = RangeMap(
        ["a", "b"],
        [[4, 5, 6], [7, 4, 8]],
        np.zeros((2, 3)),
        np.ones((2, 3)),
        np.zeros((2, 3)),
        np.ones((2, 3)),
    )
    targets = choose_targets(ranges, None, [4, 5, 6, 7, 8])
    assert (targets[4].concept, targets[4].rank) == (0, 0)  # rank 0 for a beats rank 1 for b
    assert list(first_targets(ranges, targets, [8], 3)) == [8, 4, 7]
    assert list(first_targets(ranges, targets, [], 10)) == [4, 7, 5, 6, 8]


def test_shifts_do_not_depend_on_how_neurons_are_chunked(tiny_llama, texts):
    site = resolve_site(tiny_llama.model, "mlp", 1)
    ranges = RangeMap(["a"], [[2, 9]], [[-0.1, 0.0]], [[0.1, 0.2]], [[0.0, 0.0]], [[1.0, 1.0]])
    plan = ShiftPlan(ranges, choose_targets(ranges, None, [2, 9]), texts, "the fixture's texts")
    together = range_shifts(tiny_llama, site, plan, k=4, max_length=16, chunk=2)
    apart = range_shifts(tiny_llama, site, plan, k=4, max_length=16, chunk=1)
    assert together.keys() == apart.keys() == {2, 9}
    for j in together:
        assert together[j].range.total_variation > 0
        assert together[j].range.total_variation == pytest.approx(apart[j].range.total_variation)
        assert together[j].neuron.kl == pytest.approx(apart[j].neuron.kl)
        assert [c.token for c in together[j].range.up] == [c.token for c in apart[j].range.up]

"""Range and neuron masks: oracle activations and outputs, no-ops, padding invariance, hooks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import tiny_model
from torch import nn

from rangelens.activations.capture import TokenBatch, model_inputs, record, tokenize
from rangelens.activations.models import load_model
from rangelens.activations.sites import NeuronSite, final_norm, resolve_site
from rangelens.errors import RangelensError
from rangelens.intervene import NeuronMask, RangeMask, apply_ranges
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.stats import ConceptStats

FAMILIES = ("llama", "gpt2", "bert")
SITES = ("resid", "mlp", "attn")
VOCAB = 100
# Token ids 1..99 (0 pads); distinct first tokens, so no two real tokens share an activation.
SEQS = [
    [int(t) for t in np.random.default_rng(i).integers(1, VOCAB, n)]
    for i, n in enumerate([5, 8, 3, 7, 6])
]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> nn.Module:
    return tiny_model(request.param, VOCAB)


def make_batch(seqs: Sequence[list[int]], side: str) -> TokenBatch:
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq)
        mask[row, cols] = 1
    return TokenBatch(np.arange(len(seqs)), ids, mask)


def run(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Logits of a decoder, last hidden state of an encoder."""
    with torch.no_grad():
        out = model(**model_inputs(model, batch))
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def site_acts(model: nn.Module, site: NeuronSite, batch: TokenBatch) -> torch.Tensor:
    """The site's activation in a full forward (after any mask attached before this call)."""
    with record(model, [site], stop=False) as store:
        run(model, batch)
    return store[site.name]


def bands(
    values: torch.Tensor, neurons: np.ndarray, q: tuple[float, float] = (0.25, 0.75)
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds near the ``q`` quantiles of each neuron's values (rows of ``values``), each put in the
    middle of the widest gap nearby, so float noise across batch shapes cannot flip membership."""
    cols = np.sort(values[:, neurons].double().numpy(), axis=0)
    gaps = np.diff(cols, axis=0)
    bounds = []
    for quantile in q:
        start = max(int(quantile * (len(cols) - 1)) - 2, 0)
        i = start + gaps[start : start + 5].argmax(axis=0)
        k = np.arange(len(neurons))
        assert (gaps[i, k] > 1e-3 * (cols[-1] - cols[0])).all()
        bounds.append((cols[i, k] + cols[i + 1, k]) / 2)
    return bounds[0], bounds[1]


def oracle(
    x: torch.Tensor,
    neurons: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    r: object,
    scale: float = 0,
) -> torch.Tensor:
    """``where(lo <= x <= hi, r + scale * (x - r), x)`` on the listed neurons, written by hand."""
    cols = torch.as_tensor(neurons)
    lo_t, hi_t, r_t = (torch.as_tensor(v, dtype=x.dtype) for v in (lo, hi, r))
    selected = x[..., cols]
    out = x.clone()
    out[..., cols] = torch.where(
        (lo_t <= selected) & (selected <= hi_t), r_t + scale * (selected - r_t), selected
    )
    return out


@contextmanager
def patched(model: nn.Module, site: NeuronSite, value: torch.Tensor) -> Iterator[None]:
    """Reference intervention: a plain hook that sets the site to ``value``."""
    module = model.get_submodule(site.module_path)
    if site.hook == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: (value, *args[1:]))
    else:
        handle = module.register_forward_hook(
            lambda _m, _a, out: (value, *out[1:]) if isinstance(out, tuple) else value
        )
    try:
        yield
    finally:
        handle.remove()


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def real_rows(out: torch.Tensor, batch: TokenBatch) -> list[torch.Tensor]:
    """Each text's real-token rows of ``out``, in batch order."""
    return [out[row][batch.attention_mask[row].bool()] for row in range(out.shape[0])]


def max_row_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def neurons_of(site: NeuronSite, share: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).choice(site.width, site.width // share, replace=False)


# ------------------------------------------------------------------------------- oracle and no-op


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("kind", SITES)
def test_site_and_outputs_equal_manual_oracle(model: nn.Module, kind: str, mode: str) -> None:
    site = resolve_site(model, kind, 1)
    batch = make_batch(SEQS, "right")
    bare = site_acts(model, site, batch)
    neurons = neurons_of(site)
    lo, hi = bands(bare[batch.attention_mask.bool()], neurons)
    r = np.random.default_rng(2).normal(size=neurons.size)
    scale = 0.5 if mode == "soft" else 0.0
    expected = oracle(bare, neurons, lo, hi, r, scale)
    changed = (expected != bare)[batch.attention_mask.bool()]
    assert 0.2 < changed[:, neurons].float().mean() < 0.8  # about half the values are in range

    mask = RangeMask(site, neurons, lo, hi, replacement=r, mode=mode, scale=scale)
    with mask.attach(model):
        masked = site_acts(model, site, batch)
        out = run(model, batch)
    assert torch.equal(masked, expected)
    with patched(model, site, expected):
        reference = run(model, batch)
    assert torch.equal(out, reference)
    assert not torch.allclose(out, run(model, batch))


@pytest.mark.parametrize("kind", SITES)
def test_range_containing_nothing_is_exact_noop(model: nn.Module, kind: str) -> None:
    site = resolve_site(model, kind, 0)
    batch = make_batch(SEQS, "left")
    top = float(site_acts(model, site, batch).max())
    neurons = np.arange(site.width)
    mask = RangeMask(site, neurons, np.full(site.width, top + 1), np.full(site.width, top + 2))
    with mask.attach(model):
        out = run(model, batch)
    assert torch.equal(out, run(model, batch))


def test_neuron_mask_replaces_every_value(model: nn.Module) -> None:
    site = resolve_site(model, "resid", 1)
    batch = make_batch(SEQS, "right")
    bare = site_acts(model, site, batch)
    neurons = neurons_of(site)
    with NeuronMask(site, neurons, replacement=2.5).attach(model):
        masked = site_acts(model, site, batch)
    assert (masked[..., neurons] == 2.5).all()
    others = np.setdiff1d(np.arange(site.width), neurons)
    assert torch.equal(masked[..., others], bare[..., others])


# -------------------------------------------------------------------------- padding and positions


@pytest.mark.parametrize("positions", ["all", "last"])
def test_independent_of_padding_side_and_batch_size(model: nn.Module, positions: str) -> None:
    site = resolve_site(model, "mlp", 1)
    singles = [make_batch([s], "right") for s in SEQS]
    bare_acts = torch.cat([site_acts(model, site, b)[0] for b in singles])
    neurons = neurons_of(site)
    lo, hi = bands(bare_acts, neurons)
    mask = RangeMask(site, neurons, lo, hi, replacement=1.0, positions=positions)
    with mask.attach(model):
        alone = [run(model, b)[0] for b in singles]
    assert any(not torch.allclose(a, run(model, b)[0]) for a, b in zip(alone, singles, strict=True))

    for side, size in [("left", 5), ("right", 5), ("left", 2), ("right", 3)]:
        rows: list[torch.Tensor] = []
        with mask.attach(model):
            for start in range(0, len(SEQS), size):
                batch = make_batch(SEQS[start : start + size], side)
                rows += real_rows(run(model, batch), batch)
        for got, want in zip(rows, alone, strict=True):
            assert max_row_error(got, want) <= 1e-4, (side, size)


@pytest.mark.parametrize("kind", ["resid", "mlp"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_last_position_touches_only_last_real_tokens(
    model: nn.Module, side: str, kind: str
) -> None:
    site = resolve_site(model, kind, 1)
    batch = make_batch(SEQS, side)
    bare = site_acts(model, site, batch)
    neurons = neurons_of(site)
    with NeuronMask(site, neurons, replacement=7.0, positions="last").attach(model):
        masked = site_acts(model, site, batch)
    width = batch.input_ids.shape[1]
    expected = bare.clone()
    for row, seq in enumerate(SEQS):
        last = width - 1 if side == "left" else len(seq) - 1
        expected[row, last, neurons] = 7.0
    assert torch.equal(masked, expected)


def test_last_position_reads_attention_mask_of_the_attached_model() -> None:
    model = tiny_model("llama", VOCAB)
    site = resolve_site(model, "resid", 1)
    batch = make_batch(SEQS, "right")
    inputs = model_inputs(model, batch)
    mask = NeuronMask(site, [0], positions="last")
    with mask.attach(model):
        by_keyword = site_acts(model, site, batch)
        with record(model, [site], stop=False) as store, torch.no_grad():
            model(batch.input_ids, batch.attention_mask)  # positional attention_mask
    real = batch.attention_mask.bool()  # padding rows differ: no position_ids passed
    assert torch.equal(store[site.name][real], by_keyword[real])
    lengths = batch.attention_mask.sum(1)
    assert (store[site.name][torch.arange(len(SEQS)), lengths - 1, 0] == 0).all()
    with (
        mask.attach(model),
        pytest.raises(RangelensError, match="positions 'last'"),
    ):
        model.get_submodule("model")(**inputs)  # the decoder without its LM head
    assert no_hooks(model)


# ---------------------------------------------------------------------------- hooks and composition


def test_hooks_removed_on_exit_and_on_errors(model: nn.Module) -> None:
    batch = make_batch(SEQS, "left")
    bare = run(model, batch)
    masks = [
        NeuronMask(resolve_site(model, "mlp", 0), [1, 2], positions="last"),
        NeuronMask(resolve_site(model, "resid", 2), [3]),
    ]
    with masks[0].attach(model), masks[1].attach(model):
        assert not torch.equal(run(model, batch), bare)
    assert no_hooks(model)
    assert torch.equal(run(model, batch), bare)

    with pytest.raises(IndexError), masks[0].attach(model), masks[1].attach(model):
        model(input_ids=torch.tensor([[VOCAB + 5]]))  # the forward itself raises
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="inside"), masks[0].attach(model):
        raise RuntimeError("raised inside the with-block")
    assert no_hooks(model)
    assert torch.equal(run(model, batch), bare)


def concept_fixture(
    model: nn.Module, site: NeuronSite, batch: TokenBatch
) -> tuple[RangeMap, ConceptStats]:
    """Two concepts on disjoint neurons, ranges and stats from the bare activations."""
    acts = site_acts(model, site, batch)[batch.attention_mask.bool()]
    perm = np.random.default_rng(3).permutation(site.width)
    neurons = np.stack([perm[:8], perm[8:16]])
    bounds = [bands(acts, n) for n in neurons]
    range_map = RangeMap(
        concepts=["a", "b"],
        neurons=neurons,
        lo=np.stack([b[0] for b in bounds]),
        hi=np.stack([b[1] for b in bounds]),
        mean=np.zeros(neurons.shape),
        std=np.ones(neurons.shape),
    )
    stats = ConceptStats(["a", "b"], site.width)
    stats.add(acts.double().numpy(), np.arange(len(acts)) % 2)
    return range_map, stats


@pytest.mark.parametrize("replacement", ["zero", "mean", "complement_mean"])
def test_nested_masks_equal_one_mask_over_both_concepts(model: nn.Module, replacement: str) -> None:
    site = resolve_site(model, "resid", 1)
    batch = make_batch(SEQS, "right")
    range_map, stats = concept_fixture(model, site, batch)

    def mask(concepts: str | list[str]) -> RangeMask:
        return RangeMask.from_range_map(
            site, range_map, concepts, stats=stats, replacement=replacement
        )

    with mask("a").attach(model), mask("b").attach(model):
        nested = run(model, batch)
    with mask(["a", "b"]).attach(model):
        union = run(model, batch)
    assert torch.equal(nested, union)
    assert not torch.allclose(union, run(model, batch))


def test_from_range_map_resolves_replacements() -> None:
    site = NeuronSite("resid", 0, "layers.0", "output", 6)
    range_map = RangeMap(
        concepts=["a", "b", "c"],
        neurons=np.array([[0, 1], [1, 2], [5, 4]]),
        lo=np.zeros((3, 2)),
        hi=np.ones((3, 2)),
        mean=np.zeros((3, 2)),
        std=np.ones((3, 2)),
    )
    stats = ConceptStats(["a", "b", "c"], 6)
    stats.add(np.random.default_rng(0).normal(size=(30, 6)), np.arange(30) % 3)

    mean = RangeMask.from_range_map(site, range_map, ["a", 2], stats=stats, replacement="mean")
    np.testing.assert_array_equal(mean.neurons, [0, 1, 5, 4])
    np.testing.assert_array_equal(mean.replacement, stats.pooled().mean[0][[0, 1, 5, 4]])
    rest = RangeMask.from_range_map(
        site, range_map, ["b", "c"], stats=stats, replacement="complement_mean"
    )
    np.testing.assert_array_equal(
        rest.replacement,
        np.concatenate([stats.complement(1)[0][[1, 2]], stats.complement(2)[0][[5, 4]]]),
    )
    vector = RangeMask.from_range_map(site, range_map, "b", replacement=np.arange(6.0))
    np.testing.assert_array_equal(vector.replacement, [1.0, 2.0])
    baseline = NeuronMask.from_range_map(site, range_map, "a")
    assert isinstance(baseline, NeuronMask)
    assert np.isneginf(baseline.lo).all() and np.isposinf(baseline.hi).all()
    with pytest.raises(RangelensError, match="needs stats"):
        RangeMask.from_range_map(site, range_map, "a", replacement="mean")
    with pytest.raises(RangelensError, match="unknown concept 'z'"):
        RangeMask.from_range_map(site, range_map, "z")


# ------------------------------------------------------------------------------------ validation

SITE8 = NeuronSite("resid", 0, "layers.0", "output", 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"neurons": [0, 8]}, "neuron 8 out of range for site resid.0 of width 8; valid: 0..7"),
        ({"neurons": [-1, 0]}, "neuron -1 out of range"),
        ({"neurons": [0.5, 1.0]}, "integers"),
        ({"lo": [1.0, 0.0], "hi": [0.0, 1.0]}, "lo > hi for neuron 0"),
        ({"lo": [np.nan, 0.0]}, "lo is NaN"),
        ({"hi": [1.0, 1.0, 1.0]}, r"hi has shape \(3,\); expected \(2,\)"),
        ({"replacement": "median"}, "unknown replacement 'median'; valid: 'zero', 'mean'"),
        ({"replacement": "mean"}, "needs concept statistics"),
        ({"replacement": [1.0, np.inf]}, "finite"),
        ({"positions": "first"}, "unknown positions 'first'; valid: 'all', 'last'"),
        ({"mode": "medium"}, "unknown mode 'medium'; valid: 'hard', 'soft'"),
        ({"mode": "soft", "scale": 1.0}, r"scale must be in \[0, 1\)"),
        ({"scale": 0.5}, "only applies to mode 'soft'"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"neurons": [0, 1], "lo": [0.0, 0.0], "hi": [1.0, 1.0], **kwargs}
    with pytest.raises(RangelensError, match=message) as err:
        RangeMask(SITE8, **args)  # type: ignore[arg-type]
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


def test_attach_to_a_model_without_the_site() -> None:
    with (
        pytest.raises(RangelensError, match="not in this model"),
        NeuronMask(SITE8, [0]).attach(nn.Linear(2, 2)),
    ):
        pass


# ----------------------------------------------------------------------------- standalone function


def test_apply_ranges_standalone_matches_oracle_and_keeps_dtype() -> None:
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    neurons = np.array([3, 7, 11, 0])
    lo, hi = np.array([-0.5, 0.0, -1.0, -2.0]), np.array([0.5, 1.0, 0.0, -0.1])
    r = np.array([0.1, -0.2, 0.3, 9.0])
    assert torch.equal(apply_ranges(x, neurons, lo, hi, r), oracle(x, neurons, lo, hi, r))
    soft = apply_ranges(x, neurons, lo, hi, r, "soft", 0.25)
    assert torch.equal(soft, oracle(x, neurons, lo, hi, r, 0.25))
    assert torch.equal(apply_ranges(x, neurons, lo + 10, hi + 10, r), x)
    assert torch.equal(x, before)  # out of place

    half = x.to(torch.bfloat16)
    out = apply_ranges(half, neurons, lo, hi, r)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, oracle(half, neurons, lo, hi, r))


def test_apply_ranges_processes_repeated_neurons_in_order() -> None:
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    neurons, lo, hi, r = [2, 5, 2], [-9.0, -9.0, 0.5], [9.0, 9.0, 1.5], [1.0, 0.0, -4.0]
    first = apply_ranges(x, neurons[:2], lo[:2], hi[:2], r[:2])
    expected = apply_ranges(first, neurons[2:], lo[2:], hi[2:], r[2:])
    assert torch.equal(apply_ranges(x, neurons, lo, hi, r), expected)
    assert (expected[:, 2] == -4.0).all()  # the first entry set 1.0, inside the second's range


def test_apply_ranges_last_positions() -> None:
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(2))
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    out = apply_ranges(x, [1], [-np.inf], [np.inf], 5.0, positions="last", attention_mask=attention)
    expected = x.clone()
    expected[0, 3, 1] = expected[1, 1, 1] = 5.0
    assert torch.equal(out, expected)
    unpadded = apply_ranges(x, [1], [-np.inf], [np.inf], 5.0, positions="last")
    assert torch.equal(unpadded[:, :3], x[:, :3]) and (unpadded[:, 3, 1] == 5.0).all()
    # One new token per row with a KV cache: the mask covers past and current columns.
    step = apply_ranges(
        x[:, :1], [1], [-np.inf], [np.inf], 5.0, positions="last", attention_mask=torch.ones(2, 7)
    )
    assert (step[:, 0, 1] == 5.0).all()
    with pytest.raises(RangelensError, match="attention_mask has shape"):
        apply_ranges(x, [1], [0.0], [1.0], positions="last", attention_mask=torch.ones(3, 4))


# ------------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_smollm2_all_covering_ranges_equal_neuron_mask_and_act_via_the_last_layer() -> None:
    lm = load_model("smollm2-135m")
    texts = ["The match ended in a draw after extra time.", "Stocks fell sharply today."]
    batch = tokenize(lm, texts, padding_side="left")[0]
    inputs = model_inputs(lm.model, batch)
    site = resolve_site(lm.model, "resid", -1)
    before = resolve_site(lm.model, "resid", -2)
    neurons = np.arange(0, site.width, 3)
    k = neurons.size
    covering = RangeMask(site, neurons, np.full(k, -np.inf), np.full(k, np.inf))
    with torch.no_grad():
        bare = lm.model(**inputs).logits
        with record(lm.model, [before], stop=False) as store:
            lm.model(**inputs)
        bare_before = store[before.name]
        with covering.attach(lm.model):
            ranged = lm.model(**inputs).logits
        with (
            NeuronMask(site, neurons).attach(lm.model),
            record(lm.model, [before, site], stop=False) as store,
        ):
            masked = lm.model(**inputs).logits
        norm = final_norm(lm.model)
        assert norm is not None
        head = lm.model.lm_head(norm(store[site.name]))
    assert torch.equal(ranged, masked)
    assert (store[site.name][..., neurons] == 0).all()
    assert torch.equal(store[before.name], bare_before)  # nothing before the last layer changes
    torch.testing.assert_close(head, masked, rtol=1e-5, atol=1e-5)
    assert (
        max_row_error(masked[batch.attention_mask.bool()], bare[batch.attention_mask.bool()]) > 0.01
    )

"""The NeuronLens erasure experiment: does masking a concept's ranges erase it, and at what cost?

Haider et al., "Neurons Speak in Ranges" (arXiv 2502.06809), §1 of docs/METHOD.md: ranges are fitted on
the *correctly classified* training examples only; then, for each concept c, three states are compared
on the test split: base, range mask (c's salient neurons replaced only inside c's ranges) and neuron mask
(the same neurons replaced whatever their value). Each state reports target accuracy and gold-label
confidence (test examples of c, which erasure should hurt), complement accuracy and confidence (the
other concepts, which should stay) and, for decoders, perplexity on held-out general text.

Classification tasks: ``head`` (frozen model + a linear head trained on a site's features; the default,
because small models cannot classify these datasets by prompting), ``prompt`` (label-token scoring of an
instruction/few-shot prompt, for instruction-tuned LMs) and ``finetuned`` (the user's
``AutoModelForSequenceClassification``).

Suffix-only evaluation: a mask at block L cannot change anything before L, so each batch runs the network
prefix once and caches the hidden state entering the first block that must run; every condition (base,
each concept's range and neuron masks, every tau and p) then re-runs the stock forward with the prefix
blocks swapped for pass-through modules returning that cache (:func:`skip_blocks`), so only the suffix
is computed. Model code is never forked; the stock forward still builds its masks and rotary tables.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm.auto import tqdm

from rangelens.analysis import AnalysisConfig, CaptureResult
from rangelens.artifacts import write_json, write_table, write_text
from rangelens.capture import (
    capture,
    iter_activations,
    model_inputs,
    pool,
    record,
    stop_forward,
    tokenize,
)
from rangelens.data import LabeledTexts, general_text
from rangelens.errors import RangelensError, choices
from rangelens.intervene import NeuronMask, RangeMask
from rangelens.models import LoadedModel
from rangelens.plots import erasure_bars, save_figure, tau_tradeoff
from rangelens.ranges import RangeMap, fit_ranges
from rangelens.ranking import rank
from rangelens.sites import FAMILIES, NeuronSite, blocks, resolve_site
from rangelens.stats import ConceptStats

FORMAT_VERSION = "rangelens.erasure/1"
TASKS = ("head", "prompt", "finetuned")
STATES = ("base", "range", "neuron")
METRICS = ("target_acc", "target_conf", "complement_acc", "complement_conf", "ppl")
DEFAULT_PROMPT = "Classify the text as one of: {labels}.\n\nText: {text}\nLabel:"

T = TypeVar("T")
Tau = Annotated[float, Field(gt=0)]
Share = Annotated[float, Field(gt=0, le=1)]
Readout = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class ErasureConfig(BaseModel):
    """Options of the erasure experiment. Bad values raise a one-line :class:`RangelensError`
    (when built as ``ErasureConfig(...)``) naming the option, the value and what is valid."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["head", "prompt", "finetuned"] = "head"
    concepts: list[str] | None = Field(None, description="concepts to erase (default: all)")
    tau: Tau = Field(2.0, description="headline range half-width in standard deviations")
    p: Share = Field(0.3, description="headline share of salient neurons per concept")
    taus: list[Tau] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 4.0], min_length=1)
    ps: list[Share] = Field(default_factory=lambda: [0.3], min_length=1)
    layers: list[int] | None = Field(None, description="mask-site layers (default: analysis layer)")
    replacement: Literal["zero", "mean", "complement_mean"] = "zero"
    positions: Literal["all", "last"] = "all"
    mode: Literal["hard", "soft"] = "hard"
    scale: float = Field(0.0, ge=0, lt=1, description="soft mode: keep this share of x - r")
    head_C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic head")
    head_site: str = "resid"
    head_layer: int = -1
    head_position: Literal["last", "first", "cls", "mean"] | None = Field(
        None, description="default: 'last' for decoders, 'cls' for encoders"
    )
    prompt_template: str = DEFAULT_PROMPT
    few_shot: int = Field(0, ge=0, description="training examples shown before each prompt")
    ppl_texts: int = Field(64, ge=0, description="general texts for perplexity (0: skip)")
    ppl_max_length: int = Field(64, ge=2)
    suffix: bool = Field(True, description="re-run only the blocks after the mask site")
    batch_size: int = Field(16, ge=1)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise RangelensError(_one_line(err)) from None

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            filled = v.format(text="\0", labels="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"valid placeholders are {{text}} and {{labels}} ({err})") from None
        if "\0" not in filled:
            raise ValueError("the template needs a {text} placeholder")
        return v


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in first["loc"]).lstrip(".")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg += f"; valid options: {choices(ErasureConfig.model_fields)}"
    return f"invalid erasure option {where} = {first.get('input')!r}: {msg}"


@dataclass
class ErasureResult:
    """``table``: one row per concept x state x layer x tau x p (base and neuron rows repeat across
    tau); ``headline``: one row per concept plus ``"average"`` at the headline layer, tau and p;
    ``info``: head accuracies, examples used for ranges, suffix use and timings."""

    table: pd.DataFrame
    headline: pd.DataFrame
    info: dict[str, Any]


# ------------------------------------------------------------------------------ suffix-only engine


class _PrefixDone(Exception):
    """Ends the prefix forward once the cached block has run."""


class _Cached(nn.Module):
    """Stands in for a skipped block: returns the cached hidden state, in the block's output type."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.as_tuple = as_tuple

    def forward(self, *args: Any, **_kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        incoming = args[0] if args else None
        if isinstance(incoming, torch.Tensor) and incoming.shape != self.hidden.shape:
            raise RangelensError(
                f"cached hidden state has shape {tuple(self.hidden.shape)} but this forward has "
                f"{tuple(incoming.shape)}; run the conditions on the batch the prefix ran on"
            )
        return (self.hidden,) if self.as_tuple else self.hidden


def suffix_start(model: nn.Module, sites: Sequence[NeuronSite]) -> int:
    """How many leading blocks no mask or readout at ``sites`` depends on (0: run everything).

    A ``resid`` site at layer L is block L's output, so blocks 0..L can be replaced by the cached
    output of block L; ``mlp``/``attn`` sites live inside block L, which must run. Only the mapped
    families (``rangelens.sites.FAMILIES``) are skipped, and only for sites inside the blocks.
    """
    if getattr(model.config, "model_type", None) not in FAMILIES or not sites:
        return 0
    if any(s.layer is None for s in sites):
        return 0
    return min(int(s.layer) + 1 if s.kind == "resid" else int(s.layer) for s in sites)  # type: ignore[arg-type]


@contextmanager
def skip_blocks(
    model: nn.Module, n: int, hidden: torch.Tensor, *, as_tuple: bool = False
) -> Iterator[None]:
    """Swap blocks ``0..n-1`` for pass-throughs returning ``hidden`` (block n-1's output).

    Block n then receives ``hidden`` exactly as in a full forward; embeddings, attention masks and
    rotary tables are still built by the stock forward. The original blocks are always restored.
    """
    _, layers = blocks(model)
    if not 0 < n <= len(layers):
        raise RangelensError(f"can skip 1..{len(layers)} blocks of this model, not {n}")
    originals = [layers[i] for i in range(n)]
    stand_in = _Cached(hidden, as_tuple)
    try:
        for i in range(n):
            layers[i] = stand_in
        yield
    finally:
        for i, block in enumerate(originals):
            layers[i] = block


def _prefix(model: nn.Module, inputs: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, bool]:
    """Run blocks 0..n-1 once; return block n-1's output and whether the block returns a tuple."""
    _, layers = blocks(model)
    seen: list[object] = []

    def hook(_m: nn.Module, _args: tuple[Any, ...], out: object) -> None:
        seen.append(out)
        raise _PrefixDone

    handle = layers[n - 1].register_forward_hook(hook)
    try:
        model(**inputs)
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RangelensError(f"block {n - 1} did not run in the forward; use suffix=False")
    out = seen[0]
    if isinstance(out, tuple):
        return out[0], True
    if not isinstance(out, torch.Tensor):
        raise RangelensError(f"block {n - 1} returns a {type(out).__name__}; use suffix=False")
    return out, False


def run_conditions(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    masks: Sequence[RangeMask | None],
    forward: Callable[[dict[str, torch.Tensor]], T],
    *,
    start: int = 0,
) -> list[T]:
    """``forward(inputs)`` once per mask (None: no mask), in order.

    With ``start > 0`` (see :func:`suffix_start`) blocks ``0..start-1`` run once for all masks and
    only the suffix runs per mask; ``start = 0`` runs full forwards. Masks are attached inside the
    swap, so a mask on a skipped block's output edits the cached value.
    """
    cached = _prefix(model, inputs, start) if start > 0 else None
    results = []
    for mask in masks:
        with ExitStack() as stack:
            if cached is not None:
                stack.enter_context(skip_blocks(model, start, cached[0], as_tuple=cached[1]))
            if mask is not None:
                stack.enter_context(mask.attach(model))
            results.append(forward(inputs))
    return results


# ------------------------------------------------------------------------------------------ tasks


@dataclass
class LinearHead:
    """A linear classifier on raw site features: ``log_softmax(x @ weight.T + bias)``."""

    weight: np.ndarray  # (C, d) float64, standardisation folded in
    bias: np.ndarray  # (C,)

    def log_proba(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(features).double()
        w = torch.as_tensor(self.weight, device=x.device)
        b = torch.as_tensor(self.bias, device=x.device)
        return torch.log_softmax(x @ w.T + b, dim=-1)


def fit_head(features: np.ndarray, labels: np.ndarray, n_classes: int, *, C: float = 1.0) -> LinearHead:
    """Fit the classification head of task ``head``: standardised multinomial logistic regression.

    As ``*ForSequenceClassification`` heads, it reads one pooled site (frozen model). Every class
    needs training rows.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    missing = sorted(set(range(n_classes)) - set(np.unique(y).tolist()))
    if missing:
        raise RangelensError(f"classes {missing} have no training rows; every class needs some")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    clf = LogisticRegression(C=C, max_iter=2000)
    with warnings.catch_warnings():  # a not fully converged head still classifies; keep going
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x - mean) / std, y)
    coef = clf.coef_ / std
    intercept = clf.intercept_ - coef @ mean
    if n_classes == 2:  # sklearn's single binary weight vector scores class 1 against class 0
        coef = np.vstack([np.zeros_like(coef[0]), coef[0]])
        intercept = np.array([0.0, intercept[0]])
    return LinearHead(coef, intercept)


@dataclass
class ClassificationTask:
    """What the model reads (``inputs``, one per data row) and how it turns into class log-probs."""

    name: str
    inputs: list[str]
    max_length: int
    padding_side: str | None
    readout: Readout  # forward kwargs -> (batch, C) log-probabilities, on the current model state
    sites: list[NeuronSite]  # sites the readout records (they bound the skippable prefix)
    raw: bool  # inputs are the dataset texts themselves (so the analysis capture applies)
    info: dict[str, Any]


def _has_lm_head(lm: LoadedModel) -> bool:
    return lm.kind == "decoder" and lm.model.get_output_embeddings() is not None


def _is_sequence_classifier(lm: LoadedModel) -> bool:
    return type(lm.model).__name__.endswith("ForSequenceClassification")


def _valid_tasks(lm: LoadedModel) -> list[str]:
    return [
        t
        for t, ok in zip(TASKS, (True, _has_lm_head(lm), _is_sequence_classifier(lm)), strict=True)
        if ok
    ]


def head_task(
    lm: LoadedModel,
    data: LabeledTexts,
    train: np.ndarray,
    config: ErasureConfig,
    analysis: AnalysisConfig,
    cap: CaptureResult,
    *,
    progress: bool = False,
) -> tuple[ClassificationTask, np.ndarray]:
    """Task ``head``: fit a linear head on the head site's pooled features of the training split.

    Returns the task and the features of every text at the head site (the analysis capture's when
    the head site is the analysis site, else captured once here).
    """
    site = resolve_site(lm.model, config.head_site, config.head_layer)
    position = config.head_position or ("last" if lm.kind == "decoder" else "cls")
    reuse = cap.features is not None and cap.info.get("site") == site.name
    if reuse and analysis.position == position:
        features = np.asarray(cap.features, dtype=np.float32)
    else:
        features = capture(
            lm,
            data.texts,
            [site],
            position=position,
            batch_size=config.batch_size,
            max_length=analysis.max_length,
            padding_side=analysis.padding_side,
            progress=progress,
        ).acts[site.name]
    head = fit_head(features[train], data.labels[train], len(data.label_names), C=config.head_C)
    model = lm.model

    def readout(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        with record(model, [site]) as store, stop_forward():
            model(**kwargs)
        return head.log_proba(pool(store[site.name], kwargs["attention_mask"], position).float())

    info = {"site": site.name, "position": position, "C": config.head_C}
    task = ClassificationTask(
        "head", list(data.texts), analysis.max_length, analysis.padding_side, readout, [site],
        True, info,
    )  # fmt: skip
    return task, features


def prompt_task(
    lm: LoadedModel,
    data: LabeledTexts,
    train: np.ndarray,
    config: ErasureConfig,
    analysis: AnalysisConfig,
) -> ClassificationTask:
    """Task ``prompt``: score each label's first token after an instruction (or few-shot) prompt.

    Texts are cut to ``analysis.max_length`` tokens before they are put into the template, so the
    prompt's ending is never truncated. Few-shot demonstrations are training texts, one class after
    another, fixed for every query. Prompts are left-padded, so the last column is the last token.
    """
    if not _has_lm_head(lm):
        raise RangelensError(
            f"task 'prompt' needs a decoder with an LM head; model {lm.name!r} is "
            f"{'an encoder' if lm.kind == 'encoder' else 'a ' + type(lm.model).__name__}; "
            f"valid tasks for it: {choices(_valid_tasks(lm))}"
        )
    tok = lm.tokenizer
    names = data.label_names
    label_ids = [tok(" " + n, add_special_tokens=False)["input_ids"][0] for n in names]
    if len(set(label_ids)) < len(names):
        first = {i: n for n, i in zip(names, label_ids, strict=True)}
        clash = next(n for n, i in zip(names, label_ids, strict=True) if first[i] != n)
        raise RangelensError(
            f"label {clash!r} starts with the same token as {first[label_ids[names.index(clash)]]!r}"
            f"; prompt scoring needs labels with distinct first tokens, or use task 'head'"
        )
    cut = tok(list(data.texts), add_special_tokens=False, truncation=True,
              max_length=analysis.max_length)["input_ids"]  # fmt: skip
    short = [tok.decode(ids) for ids in cut]
    labels_text = ", ".join(names)
    rng = np.random.default_rng(analysis.seed)
    pools = [list(rng.permutation(train[data.labels[train] == c])) for c in range(len(names))]
    demos = []
    for k in range(config.few_shot):
        c = k % len(names)
        if not pools[c]:
            raise RangelensError(
                f"few_shot {config.few_shot} needs more training texts of {names[c]!r}; "
                f"valid: at most {len(names) * min(len(p) for p in pools)}"
            )
        i = int(pools[c].pop())
        demos.append(config.prompt_template.format(text=short[i], labels=labels_text))
        demos[-1] += f" {names[c]}\n\n"
    prefix = "".join(demos)
    inputs = [prefix + config.prompt_template.format(text=s, labels=labels_text) for s in short]
    longest = max(len(ids) for ids in tok(inputs)["input_ids"])
    model = lm.model
    columns = torch.tensor(label_ids, device=lm.device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def readout(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**kwargs, **extra).logits[:, -1]
        return torch.log_softmax(logits.index_select(-1, columns).double(), dim=-1)

    info = {"label_tokens": dict(zip(names, label_ids, strict=True)), "few_shot": config.few_shot}
    return ClassificationTask("prompt", inputs, longest, "left", readout, [], False, info)


def finetuned_task(lm: LoadedModel, data: LabeledTexts, analysis: AnalysisConfig) -> ClassificationTask:
    """Task ``finetuned``: the model's own sequence-classification head.

    Its ``id2label`` must name every dataset label (case-insensitive); extra model labels are
    ignored and the probabilities renormalised over the dataset's labels.
    """
    if not _is_sequence_classifier(lm):
        raise RangelensError(
            f"task 'finetuned' needs an AutoModelForSequenceClassification checkpoint; model "
            f"{lm.name!r} is a {type(lm.model).__name__}; valid tasks for it: "
            f"{choices(_valid_tasks(lm))}"
        )
    id2label = {int(i): str(n) for i, n in lm.model.config.id2label.items()}
    by_name = {n.strip().lower(): i for i, n in id2label.items()}
    missing = [n for n in data.label_names if n.strip().lower() not in by_name]
    if missing:
        raise RangelensError(
            f"finetuned model labels {choices(id2label.values())} do not match dataset label "
            f"{missing[0]!r}; valid dataset labels for this model: {choices(id2label.values())}"
        )
    order = torch.tensor([by_name[n.strip().lower()] for n in data.label_names], device=lm.device)
    model = lm.model
    if getattr(model.config, "pad_token_id", None) is None:  # stock heads find the last token by it
        model.config.pad_token_id = lm.tokenizer.pad_token_id

    def readout(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**kwargs).logits.index_select(-1, order)
        return torch.log_softmax(logits.double(), dim=-1)

    info = {"id2label": id2label}
    return ClassificationTask(
        "finetuned", list(data.texts), analysis.max_length, analysis.padding_side, readout, [],
        True, info,
    )  # fmt: skip


def token_nll(model: nn.Module, kwargs: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed next-token NLL over the real tokens of a batch, and how many tokens were predicted."""
    logits = model(**kwargs).logits
    mask = kwargs["attention_mask"].bool()
    valid = mask[:, :-1] & mask[:, 1:]
    targets = kwargs["input_ids"][:, 1:][valid]
    nll = nn.functional.cross_entropy(logits[:, :-1][valid].float(), targets, reduction="sum")
    return float(nll), int(valid.sum())


# ------------------------------------------------------------------------------------- experiment


@dataclass
class _Condition:
    state: str
    concept: int | None = None
    layer: int | None = None
    tau: float | None = None
    p: float | None = None
    mask: RangeMask | None = None


@dataclass
class _Group:
    """Conditions sharing one mask site, hence one prefix."""

    site: NeuronSite | None
    conditions: list[_Condition]


def _check_inputs(
    lm: LoadedModel, data: LabeledTexts, cap: CaptureResult, config: ErasureConfig
) -> list[int]:
    """Validate everything cheap before any forward; return the indices of the concepts to erase."""
    if len(cap.labels) != len(data) or not np.array_equal(cap.labels, data.labels):
        raise RangelensError(
            f"capture has {len(cap.labels)} labelled texts that differ from dataset {data.name!r} "
            f"({len(data)} texts); pass the capture made on this data"
        )
    if list(cap.label_names) != list(data.label_names):
        raise RangelensError(
            f"capture concepts {cap.label_names} differ from the dataset's {data.label_names}"
        )
    for name in config.concepts or []:
        if name not in data.label_names:
            raise RangelensError(
                f"concept {name!r} not in dataset {data.name!r}; valid: {choices(data.label_names)}"
            )
    if config.task == "prompt" and not _has_lm_head(lm) or (
        config.task == "finetuned" and not _is_sequence_classifier(lm)
    ):
        what = "a decoder with an LM head" if config.task == "prompt" else (
            "an AutoModelForSequenceClassification checkpoint"
        )  # fmt: skip
        kind = "an encoder" if lm.kind == "encoder" else f"a {type(lm.model).__name__}"
        raise RangelensError(
            f"task {config.task!r} needs {what}; model {lm.name!r} is {kind}; valid tasks for it: "
            f"{choices(_valid_tasks(lm))}"
        )
    if "ppl_texts" in config.model_fields_set and config.ppl_texts > 0 and not _has_lm_head(lm):
        raise RangelensError(
            f"ppl_texts = {config.ppl_texts}: perplexity needs a decoder with an LM head; model "
            f"{lm.name!r} has none; valid: ppl_texts = 0"
        )
    wanted = config.concepts or data.label_names
    return [data.label_names.index(n) for n in wanted]


def _predict(
    lm: LoadedModel, task: ClassificationTask, rows: np.ndarray, batch_size: int
) -> np.ndarray:
    """Unmasked class log-probabilities ``(len(rows), C)`` of the task on ``rows``."""
    out = np.zeros((len(rows), 0))
    for batch in tokenize(lm, [task.inputs[i] for i in rows], batch_size=batch_size,
                          max_length=task.max_length, padding_side=task.padding_side):  # fmt: skip
        logp = task.readout(model_inputs(lm.model, batch)).cpu().numpy()
        if out.shape[1] == 0:
            out = np.zeros((len(rows), logp.shape[1]))
        out[batch.index] = logp
    return out


def _concept_stats(
    lm: LoadedModel,
    task: ClassificationTask,
    cap: CaptureResult,
    site: NeuronSite,
    rows: np.ndarray,
    labels: np.ndarray,
    analysis: AnalysisConfig,
    batch_size: int,
) -> tuple[ConceptStats, np.ndarray | None]:
    """Per-concept statistics (and pooled features, None for tokens) of ``rows`` at ``site``.

    Reuses the analysis capture when it holds pooled features of these inputs at this site; else
    re-captures only ``rows`` (streaming, so ``position='tokens'`` works too).
    """
    stats = ConceptStats(cap.label_names, site.width, n_bins=analysis.n_bins)
    if task.raw and cap.features is not None and cap.info.get("site") == site.name:
        features = np.asarray(cap.features[rows], dtype=np.float32)
        stats.add(features, labels[rows])
        return stats, features
    pooled = analysis.position != "tokens"
    features = np.zeros((len(rows), site.width), dtype=np.float32) if pooled else None
    for batch in iter_activations(
        lm,
        [task.inputs[i] for i in rows],
        [site],
        position=analysis.position,
        batch_size=batch_size,
        max_length=task.max_length,
        padding_side=task.padding_side,
        progress=False,
    ):
        acts = batch.acts[site.name].numpy()
        stats.add(acts, labels[rows[batch.rows]])
        if features is not None:
            features[batch.index] = acts
    return stats, features


def _masks_for_site(
    site: NeuronSite,
    stats: ConceptStats,
    scores: np.ndarray,
    concepts: list[int],
    taus: list[float],
    ps: list[float],
    config: ErasureConfig,
    analysis: AnalysisConfig,
) -> list[_Condition]:
    options = {
        "stats": stats,
        "replacement": config.replacement,
        "positions": config.positions,
        "mode": config.mode,
        "scale": config.scale,
    }
    conditions = []
    for p in ps:
        maps: dict[float, RangeMap] = {
            tau: fit_ranges(stats, scores, tau=tau, p=p, method=analysis.range_method)
            for tau in taus
        }
        for c in concepts:
            mask = NeuronMask.from_range_map(site, maps[taus[0]], c, **options)
            conditions.append(_Condition("neuron", c, site.layer, None, p, mask))
            for tau in taus:
                mask = RangeMask.from_range_map(site, maps[tau], c, **options)
                conditions.append(_Condition("range", c, site.layer, tau, p, mask))
    return conditions


def _run_groups(
    lm: LoadedModel,
    texts: list[str],
    groups: list[_Group],
    forward: Callable[[dict[str, torch.Tensor]], T],
    *,
    readout_sites: list[NeuronSite],
    suffix: bool,
    batch_size: int,
    max_length: int,
    padding_side: str | None,
    bar: Any,
) -> tuple[list[list[list[tuple[np.ndarray, T]]]], dict[str, int]]:
    """Every condition of every group on every batch; per group and condition, (index, output)
    pairs in batch order. Also returns the blocks skipped per mask site."""
    batches = tokenize(
        lm, texts, batch_size=batch_size, max_length=max_length, padding_side=padding_side
    )
    starts = {}
    for group in groups:
        sites = readout_sites + ([group.site] if group.site is not None else [])
        key = group.site.name if group.site is not None else "base"
        starts[key] = suffix_start(lm.model, sites) if suffix else 0
    results: list[list[list[tuple[np.ndarray, T]]]] = [
        [[] for _ in g.conditions] for g in groups
    ]
    for batch in batches:
        kwargs = model_inputs(lm.model, batch)
        for g, group in enumerate(groups):
            key = group.site.name if group.site is not None else "base"
            masks = [c.mask for c in group.conditions]
            outputs = run_conditions(lm.model, kwargs, masks, forward, start=starts[key])
            for c, out in enumerate(outputs):
                results[g][c].append((batch.index, out))
            bar.update(len(masks))
    return results, starts


def run_erasure(
    lm: LoadedModel,
    data: LabeledTexts,
    capture: CaptureResult,
    analysis: AnalysisConfig,
    config: ErasureConfig,
    out_dir: Path,
    *,
    progress: bool = True,
) -> ErasureResult:
    """Run the NeuronLens erasure experiment (Haider et al., arXiv 2502.06809) and write its files.

    Builds the task, predicts the training split, fits concept statistics on the *correctly
    classified* training texts at the analysis site (reusing ``capture``'s pooled features when they
    are of these inputs at that site, else re-capturing, which also covers ``position='tokens'``),
    ranks neurons with ``analysis.ranking`` and fits ranges for every (tau, p); then evaluates base,
    range-mask and neuron-mask states for each concept on the test split and, for decoders with an
    LM head, perplexity on general text (``rangelens.data.general_text``; skipped for other models
    unless ``ppl_texts`` is set explicitly, which is then an error). ``capture`` must come from
    ``lm`` on ``data``.

    Writes into ``out_dir``: ``erasure.csv`` and ``erasure.parquet`` (the table), ``headline.md``,
    ``erasure.json`` (format ``rangelens.erasure/1``: config, info, headline), ``erasure_bars.png``
    and ``tau_tradeoff.png``, each atomically.
    """
    started = time.perf_counter()
    concepts = _check_inputs(lm, data, capture, config)
    taus = sorted({*config.taus, config.tau})
    ps = sorted({*config.ps, config.p})
    layer_sites = {}
    for layer in [analysis.layer, *(config.layers or [])]:
        site = resolve_site(lm.model, analysis.site, layer)
        layer_sites.setdefault(site.layer, site)
    headline_site = resolve_site(lm.model, analysis.site, analysis.layer)
    train, test = np.asarray(capture.train), np.asarray(capture.test)
    timings: dict[str, float] = {}
    info: dict[str, Any] = {"task": config.task, "model": lm.name, "dataset": data.name}

    with torch.inference_mode():
        # 1. the task, and which training texts it classifies correctly
        clock = time.perf_counter()
        if config.task == "head":
            task, head_features = head_task(
                lm, data, train, config, analysis, capture, progress=progress
            )
            train_logp = task_logp = None
            train_pred = (
                fit_head_predict := lambda rows: (
                    task_head_logp(task, head_features, rows)  # noqa: E731
                )
            )
        timings["task"] = time.perf_counter() - clock
    raise NotImplementedError

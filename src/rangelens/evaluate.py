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
When the mask site is the ``head`` task's own pooled site (the default: last block, last token), a
mask acts on the cached feature directly (:class:`PooledHead`): classification needs no forward at
all. ``suffix=False`` forces full forwards everywhere.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import pandas as pd
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm.auto import tqdm

from rangelens.analysis import AnalysisConfig, CaptureResult
from rangelens.artifacts import read_json, write_json, write_table, write_text
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
from rangelens.intervene import NeuronMask, RangeMask, apply_ranges
from rangelens.models import LoadedModel
from rangelens.plots import erasure_bars, save_figure, tau_tradeoff
from rangelens.ranges import fit_ranges
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

    @model_validator(mode="after")
    def _scale_needs_soft(self) -> ErasureConfig:
        if self.mode == "hard" and self.scale != 0:
            raise ValueError(f"scale {self.scale!r} only applies to mode 'soft'; use 0 with 'hard'")
        return self

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
    """What :func:`run_erasure` measured (also written to its output directory).

    ``table`` (``erasure.csv`` / ``.parquet``): one row per concept x state x mask site x tau x p
    (base and neuron rows repeat across tau) with columns concept, state (base | range | neuron),
    site, layer, tau, p, target_acc, target_conf, complement_acc, complement_conf, ppl (NaN without
    an LM head), n_target, n_complement and ``delta_<metric>`` = state - base. ``headline``: one
    row per concept plus ``"average"`` at the analysis site, tau and p (see
    :func:`headline_table`). ``info``: accuracies, correct training examples used for ranges, how
    each condition was computed (cached features, or forwards skipping blocks) and timings.
    """

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
    mapped = getattr(model.config, "model_type", None) in FAMILIES
    if not mapped or not sites or any(s.layer is None for s in sites):
        return 0
    return min(s.layer + (s.kind == "resid") for s in sites if s.layer is not None)


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


def fit_head(
    features: np.ndarray, labels: np.ndarray, n_classes: int, *, C: float = 1.0
) -> LinearHead:
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
class PooledHead:
    """Task ``head``'s classifier on cached pooled features of every data row.

    A mask at the head site itself acts elementwise on the very row the head reads (the last or
    first token; not a mean), so its effect on the head equals :func:`apply_ranges` on the cached
    row: no forward needed. The default setting (resid, last block, last token) is such a case.
    """

    site: NeuronSite
    position: str
    features: np.ndarray  # (n, d)
    head: LinearHead

    def covers(self, mask: RangeMask | None) -> bool:
        """Whether :meth:`log_proba` gives the same result as a forward with ``mask``."""
        if mask is None:
            return True
        one_row = self.position != "mean" and (mask.positions == "all" or self.position == "last")
        return mask.site.name == self.site.name and one_row

    def log_proba(self, rows: np.ndarray, mask: RangeMask | None = None) -> np.ndarray:
        x = torch.from_numpy(self.features[rows])
        if mask is not None:
            x = apply_ranges(
                x, mask.neurons, mask.lo, mask.hi, mask.replacement, mask.mode, mask.scale
            )
        return self.head.log_proba(x).numpy()


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
    pooled: PooledHead | None = None  # task head: the classifier on cached features


def _has_lm_head(lm: LoadedModel) -> bool:
    return lm.kind == "decoder" and lm.model.get_output_embeddings() is not None


def _is_sequence_classifier(lm: LoadedModel) -> bool:
    return type(lm.model).__name__.endswith("ForSequenceClassification")


def _unfit(lm: LoadedModel, task: str, needs: str) -> RangelensError:
    fits = (True, _has_lm_head(lm), _is_sequence_classifier(lm))
    valid = [t for t, ok in zip(TASKS, fits, strict=True) if ok]
    kind = "an encoder" if lm.kind == "encoder" else f"a {type(lm.model).__name__}"
    return RangelensError(
        f"task {task!r} needs {needs}; model {lm.name!r} is {kind}; valid tasks for it: "
        f"{choices(valid)}"
    )


def head_task(
    lm: LoadedModel,
    data: LabeledTexts,
    train: np.ndarray,
    config: ErasureConfig,
    analysis: AnalysisConfig,
    cap: CaptureResult,
    *,
    progress: bool = False,
) -> ClassificationTask:
    """Task ``head``: a linear head fitted on the head site's pooled features of the training split.

    The features are the analysis capture's when the head site and position are the analysis ones,
    else captured once here; the task keeps them (:class:`PooledHead`).
    """
    site = resolve_site(lm.model, config.head_site, config.head_layer)
    position = config.head_position or ("last" if lm.kind == "decoder" else "cls")
    same = cap.info.get("site") == site.name and analysis.position == position
    if same and cap.features is not None:
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

    return ClassificationTask(
        name="head",
        inputs=list(data.texts),
        max_length=analysis.max_length,
        padding_side=analysis.padding_side,
        readout=readout,
        sites=[site],
        raw=True,
        info={"site": site.name, "position": position, "C": config.head_C},
        pooled=PooledHead(site, position, features, head),
    )


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
        raise _unfit(lm, "prompt", "a decoder with an LM head")
    tok = lm.tokenizer
    names = data.label_names
    label_ids = [tok(" " + n, add_special_tokens=False)["input_ids"][0] for n in names]
    seen: dict[int, str] = {}
    for name, token in zip(names, label_ids, strict=True):
        if token in seen:
            raise RangelensError(
                f"labels {seen[token]!r} and {name!r} start with the same token; prompt scoring "
                f"needs distinct first tokens; valid tasks for these labels: 'head', 'finetuned'"
            )
        seen[token] = name
    cut = tok(
        list(data.texts), add_special_tokens=False, truncation=True, max_length=analysis.max_length
    )["input_ids"]
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
    extra = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )

    def readout(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**kwargs, **extra).logits[:, -1]
        return torch.log_softmax(logits.index_select(-1, columns).double(), dim=-1)

    return ClassificationTask(
        name="prompt",
        inputs=inputs,
        max_length=longest,
        padding_side="left",
        readout=readout,
        sites=[],
        raw=False,
        info={
            "label_tokens": dict(zip(names, label_ids, strict=True)),
            "few_shot": config.few_shot,
        },
    )


def finetuned_task(
    lm: LoadedModel, data: LabeledTexts, analysis: AnalysisConfig
) -> ClassificationTask:
    """Task ``finetuned``: the model's own sequence-classification head.

    Its ``id2label`` must name every dataset label (case-insensitive); extra model labels are
    ignored and the probabilities renormalised over the dataset's labels.
    """
    if not _is_sequence_classifier(lm):
        raise _unfit(lm, "finetuned", "an AutoModelForSequenceClassification checkpoint")
    id2label = {int(i): str(n) for i, n in (lm.model.config.id2label or {}).items()}
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

    return ClassificationTask(
        name="finetuned",
        inputs=list(data.texts),
        max_length=analysis.max_length,
        padding_side=analysis.padding_side,
        readout=readout,
        sites=[],
        raw=True,
        info={"id2label": id2label},
    )


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
    """One masked (or base) state; ``tau`` is None for neuron masks, everything None for base."""

    state: str
    concept: int | None = None
    site: str | None = None
    tau: float | None = None
    p: float | None = None
    mask: RangeMask | None = None

    @property
    def key(self) -> tuple[str, int | None, str | None, float | None, float | None]:
        return (self.state, self.concept, self.site, self.tau, self.p)


@dataclass
class _Group:
    """Conditions whose masks sit at one site, so they share one prefix per batch."""

    site: NeuronSite
    conditions: list[_Condition]


def _check_inputs(
    lm: LoadedModel, data: LabeledTexts, cap: CaptureResult, config: ErasureConfig
) -> list[int]:
    """Cheap checks before any forward; returns the indices of the concepts to erase."""
    if len(cap.labels) != len(data) or not np.array_equal(cap.labels, data.labels):
        raise RangelensError(
            f"the capture's {len(cap.labels)} labels differ from dataset {data.name!r} "
            f"({len(data)} texts); pass the capture made on this data"
        )
    if list(cap.label_names) != list(data.label_names):
        raise RangelensError(
            f"capture concepts {choices(cap.label_names)} differ from the dataset's "
            f"{choices(data.label_names)}; pass the capture made on this data"
        )
    for name in config.concepts or []:
        if name not in data.label_names:
            raise RangelensError(
                f"concept {name!r} not in dataset {data.name!r}; valid: {choices(data.label_names)}"
            )
    if "ppl_texts" in config.model_fields_set and config.ppl_texts > 0 and not _has_lm_head(lm):
        raise RangelensError(
            f"ppl_texts = {config.ppl_texts}: perplexity needs a decoder with an LM head and model "
            f"{lm.name!r} has none; valid for it: ppl_texts = 0"
        )
    return [data.label_names.index(n) for n in dict.fromkeys(config.concepts or data.label_names)]


def _build_task(
    lm: LoadedModel,
    data: LabeledTexts,
    cap: CaptureResult,
    analysis: AnalysisConfig,
    config: ErasureConfig,
    progress: bool,
) -> ClassificationTask:
    if config.task == "prompt":
        return prompt_task(lm, data, cap.train, config, analysis)
    if config.task == "finetuned":
        return finetuned_task(lm, data, analysis)
    return head_task(lm, data, cap.train, config, analysis, cap, progress=progress)


def _unmasked_logp(
    lm: LoadedModel, task: ClassificationTask, rows: np.ndarray, batch_size: int
) -> np.ndarray:
    """Class log-probabilities ``(len(rows), C)`` of ``rows`` without any mask."""
    if task.pooled is not None:
        return task.pooled.log_proba(rows)
    parts = []
    texts = [task.inputs[i] for i in rows]
    for batch in tokenize(
        lm, texts, batch_size=batch_size, max_length=task.max_length, padding_side=task.padding_side
    ):
        parts.append((batch.index, task.readout(model_inputs(lm.model, batch)).cpu().numpy()))
    out = np.zeros((len(rows), parts[0][1].shape[1]))
    for index, logp in parts:
        out[index] = logp
    return out


def _concept_stats(
    lm: LoadedModel,
    task: ClassificationTask,
    cap: CaptureResult,
    site: NeuronSite,
    rows: np.ndarray,
    analysis: AnalysisConfig,
    batch_size: int,
) -> tuple[ConceptStats, np.ndarray | None]:
    """Per-concept statistics of ``rows`` at ``site`` (and their pooled features; None for tokens).

    Reuses the analysis capture when it holds pooled features of these inputs at this site, else
    re-captures ``rows`` only, streaming (so ``position='tokens'`` works too).
    """
    labels = cap.labels
    stats = ConceptStats(cap.label_names, site.width, n_bins=analysis.n_bins)
    if task.raw and cap.features is not None and cap.info.get("site") == site.name:
        captured = np.asarray(cap.features[rows], dtype=np.float32)
        stats.add(captured, labels[rows])
        return stats, captured
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


def _mask_conditions(
    site: NeuronSite,
    stats: ConceptStats,
    scores: np.ndarray,
    concepts: list[int],
    taus: list[float],
    ps: list[float],
    config: ErasureConfig,
    analysis: AnalysisConfig,
) -> list[_Condition]:
    """Neuron masks per (concept, p) and range masks per (concept, tau, p) at ``site``."""
    options: dict[str, Any] = {
        "stats": stats,
        "replacement": config.replacement,
        "positions": config.positions,
        "mode": config.mode,
        "scale": config.scale,
    }
    conditions = []
    for p in ps:
        maps = {
            t: fit_ranges(stats, scores, tau=t, p=p, method=analysis.range_method) for t in taus
        }
        for c in concepts:
            neuron = NeuronMask.from_range_map(site, maps[taus[0]], c, **options)
            conditions.append(_Condition("neuron", c, site.name, None, p, neuron))
            for t in taus:
                ranged = RangeMask.from_range_map(site, maps[t], c, **options)
                conditions.append(_Condition("range", c, site.name, t, p, ranged))
    return conditions


def _run_groups(
    lm: LoadedModel,
    texts: list[str],
    groups: list[_Group],
    forward: Callable[[dict[str, torch.Tensor]], T],
    starts: list[int],
    *,
    config: ErasureConfig,
    max_length: int,
    padding_side: str | None,
    bar: Any,
) -> dict[int, list[tuple[np.ndarray, T]]]:
    """Every condition of ``groups`` on every batch of ``texts`` (group g skips ``starts[g]``
    blocks): per condition (by ``id``) the ``(text index, output)`` of each batch."""
    results: dict[int, list[tuple[np.ndarray, T]]] = {
        id(c): [] for g in groups for c in g.conditions
    }
    if not groups:
        return results
    batches = tokenize(
        lm, texts, batch_size=config.batch_size, max_length=max_length, padding_side=padding_side
    )
    bar.total += len(results) * len(batches)
    bar.refresh()
    for batch in batches:
        kwargs = model_inputs(lm.model, batch)
        for group, start in zip(groups, starts, strict=True):
            masks = [c.mask for c in group.conditions]
            outputs = run_conditions(lm.model, kwargs, masks, forward, start=start)
            for condition, out in zip(group.conditions, outputs, strict=True):
                results[id(condition)].append((batch.index, out))
            bar.update(len(masks))
    return results


def _starts(
    lm: LoadedModel, groups: list[_Group], readout: list[NeuronSite], suffix: bool
) -> list[int]:
    return [suffix_start(lm.model, [*readout, g.site]) if suffix else 0 for g in groups]


def _skipping(lm: LoadedModel, groups: list[_Group], starts: list[int]) -> dict[str, Any]:
    """Per mask site: how many blocks each condition's forward skipped and re-ran."""
    n = len(blocks(lm.model)[1])
    return {
        g.site.name: {"skipped_blocks": s, "rerun_blocks": n - s}
        for g, s in zip(groups, starts, strict=True)
    }


def _classify(
    lm: LoadedModel,
    task: ClassificationTask,
    rows: np.ndarray,
    groups: list[_Group],
    config: ErasureConfig,
    bar: Any,
) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """Class log-probabilities of ``rows`` under every condition (by ``id``), and how they were
    computed: from cached pooled features where the masks allow it (with ``suffix``), else by
    forwards that skip the blocks before each mask site."""
    logps: dict[int, np.ndarray] = {}
    cached: list[_Group] = []
    if task.pooled is not None and config.suffix:
        pooled = task.pooled
        cached = [g for g in groups if all(pooled.covers(c.mask) for c in g.conditions)]
        logps = {id(c): pooled.log_proba(rows, c.mask) for g in cached for c in g.conditions}
    run = [g for g in groups if g not in cached]
    starts = _starts(lm, run, task.sites, config.suffix)
    outputs = _run_groups(
        lm,
        [task.inputs[i] for i in rows],
        run,
        task.readout,
        starts,
        config=config,
        max_length=task.max_length,
        padding_side=task.padding_side,
        bar=bar,
    )
    for key, pairs in outputs.items():
        logps[key] = np.zeros((len(rows), pairs[0][1].shape[1]))
        for index, out in pairs:
            logps[key][index] = out.cpu().numpy()
    how = {"cached_features": [g.site.name for g in cached], "forwards": _skipping(lm, run, starts)}
    return logps, how


def _perplexity(
    lm: LoadedModel, groups: list[_Group], config: ErasureConfig, seed: int, bar: Any
) -> tuple[dict[int, float], dict[str, Any]]:
    """Perplexity on general text under every condition (by ``id``); NaN without an LM head."""
    conditions = [c for g in groups for c in g.conditions]
    if not _has_lm_head(lm) or config.ppl_texts == 0:
        reason = "ppl_texts = 0" if _has_lm_head(lm) else "the model has no LM head"
        return {id(c): float("nan") for c in conditions}, {"skipped": reason}
    general = general_text(config.ppl_texts, seed=seed)
    starts = _starts(lm, groups, [], config.suffix)
    sums = _run_groups(
        lm,
        general,
        groups,
        partial(token_nll, lm.model),
        starts,
        config=config,
        max_length=config.ppl_max_length,
        padding_side=None,
        bar=bar,
    )
    n_tokens = sum(n for _, (_, n) in sums[id(conditions[0])])  # the same for every condition
    ppl = {k: float(np.exp(sum(nll for _, (nll, _) in v) / n_tokens)) for k, v in sums.items()}
    how = {"n_texts": len(general), "n_tokens": n_tokens, "forwards": _skipping(lm, groups, starts)}
    return ppl, how


def _accuracy_metrics(logp: np.ndarray, labels: np.ndarray, c: int) -> dict[str, float]:
    """Target (label c) and complement accuracy and mean gold-label probability."""
    correct = logp.argmax(axis=1) == labels
    gold = np.exp(logp[np.arange(len(labels)), labels])
    target = labels == c
    return {
        "target_acc": float(correct[target].mean()),
        "target_conf": float(gold[target].mean()),
        "complement_acc": float(correct[~target].mean()),
        "complement_conf": float(gold[~target].mean()),
    }


def _table(
    conditions: list[_Condition],
    logps: dict[int, np.ndarray],
    ppls: dict[int, float],
    labels: np.ndarray,
    names: list[str],
    concepts: list[int],
    sites: list[NeuronSite],
    taus: list[float],
    ps: list[float],
) -> pd.DataFrame:
    """The long table: one row per concept x state x site x tau x p, with deltas vs base."""
    found = {cond.key: id(cond) for cond in conditions}
    base = found[("base", None, None, None, None)]
    rows: list[dict[str, Any]] = []
    for site, p, tau, c in itertools.product(sites, ps, taus, concepts):
        states = {
            "base": base,
            "range": found[("range", c, site.name, tau, p)],
            "neuron": found[("neuron", c, site.name, None, p)],
        }
        before = {**_accuracy_metrics(logps[base], labels, c), "ppl": ppls[base]}
        for state, i in states.items():
            values = {**_accuracy_metrics(logps[i], labels, c), "ppl": ppls[i]}
            rows.append(
                {
                    "concept": names[c],
                    "state": state,
                    "site": site.name,
                    "layer": site.layer,
                    "tau": tau,
                    "p": p,
                    **values,
                    "n_target": int((labels == c).sum()),
                    "n_complement": int((labels != c).sum()),
                    **{f"delta_{m}": values[m] - before[m] for m in METRICS},
                }
            )
    return pd.DataFrame(rows)


def headline_table(table: pd.DataFrame, *, site: str, tau: float, p: float) -> pd.DataFrame:
    """One row per concept and an ``"average"`` row at (site, tau, p): base values, and for range
    and neuron masking the drops ``base - masked`` of accuracy and confidence and the perplexity
    change ``masked - base``."""
    at = table[(table["site"] == site) & (table["tau"] == tau) & (table["p"] == p)]
    by_state = {s: at[at["state"] == s].set_index("concept") for s in STATES}
    frame = pd.DataFrame(index=by_state["base"].index)
    frame["base_target_acc"] = by_state["base"]["target_acc"]
    frame["base_complement_acc"] = by_state["base"]["complement_acc"]
    frame["base_ppl"] = by_state["base"]["ppl"]
    for state in ("range", "neuron"):
        delta = by_state[state]
        for metric in ("target_acc", "complement_acc", "target_conf", "complement_conf"):
            frame[f"{state}_{metric}_drop"] = 0.0 - delta[f"delta_{metric}"]  # never -0.0
        frame[f"{state}_ppl_change"] = delta["delta_ppl"]
    frame.loc["average"] = frame.mean(axis=0)
    return frame.rename_axis("concept").reset_index()


def _markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table; NaN shows as an en dash."""

    def cell(v: object) -> str:
        if isinstance(v, float | np.floating):
            return "–" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(str(c) for c in frame.columns) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"


def _sweep_summary(table: pd.DataFrame, *, site: str, p: float) -> pd.DataFrame:
    """Average over concepts per tau of the drops for range masking, and for neuron masking."""
    at = table[(table["site"] == site) & (table["p"] == p)]
    cols = {"delta_target_acc": "target_drop", "delta_complement_acc": "complement_drop"}
    out = pd.DataFrame(index=sorted(at["tau"].unique()))
    for state in ("range", "neuron"):
        mean = at[at["state"] == state].groupby("tau")[[*cols, "delta_ppl"]].mean()
        for col, name in cols.items():
            out[f"{state}_{name}"] = 0.0 - mean[col]
        out[f"{state}_ppl_change"] = mean["delta_ppl"]
    return out.rename_axis("tau").reset_index()


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-able rows with NaN as null (strict JSON)."""
    records: list[dict[str, Any]] = json.loads(frame.to_json(orient="records"))
    return records


def _write(out_dir: Path, result: ErasureResult, config: ErasureConfig, site: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / "erasure.csv", result.table)
    _write_parquet(out_dir / "erasure.parquet", result.table)
    info = result.info
    text = (
        f"# NeuronLens erasure: {info['model']} on {info['dataset']} (task {config.task})\n\n"
        f"Masks at {site}, tau = {config.tau:g}, p = {config.p:g}, replacement "
        f"{config.replacement}, positions {config.positions}, mode {config.mode}; test split of "
        f"{info['n_test']} texts. Drops are base - masked; ppl change is masked - base.\n\n"
        + _markdown(result.headline)
        + f"\n## tau sweep (average over concepts, p = {config.p:g})\n\n"
        + _markdown(pd.DataFrame(info["sweep"]))
    )
    write_text(out_dir / "headline.md", text)
    write_json(
        out_dir / "erasure.json",
        {
            "format": FORMAT_VERSION,
            "config": config.model_dump(),
            "info": info,
            "headline": _records(result.headline),
        },
    )
    title = f"{info['model']} / {info['dataset']}: {site}, tau = {config.tau:g}, p = {config.p:g}"
    save_figure(erasure_bars(result.headline, title=title), out_dir / "erasure_bars.png")
    save_figure(
        tau_tradeoff(result.table, p=config.p, site=site, title=f"{site}, p = {config.p:g}"),
        out_dir / "tau_tradeoff.png",
    )


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

    Builds the task and keeps the training texts it classifies correctly; fits per-concept
    statistics on those at the analysis site (``analysis.site`` at ``analysis.layer`` and every
    ``config.layers``; reusing ``capture``'s pooled features when they are of these inputs at that
    site, else re-capturing, which also covers ``position='tokens'``), ranks neurons with
    ``analysis.ranking`` and fits ranges for every (tau, p). Then evaluates base, range-mask and
    neuron-mask states for each concept on the test split and, for decoders with an LM head,
    perplexity on general text (``rangelens.data.general_text``; other models skip it unless
    ``ppl_texts`` is set explicitly, which is then an error). ``capture`` must come from ``lm`` on
    ``data`` (its split is used).

    Writes into ``out_dir``: ``erasure.csv`` and ``erasure.parquet`` (the table), ``headline.md``,
    ``erasure.json`` (format ``rangelens.erasure/1``: config, info, headline), ``erasure_bars.png``
    and ``tau_tradeoff.png``; each file atomically, all after the computation succeeded.
    """
    started = time.perf_counter()
    concepts = _check_inputs(lm, data, capture, config)
    taus = sorted({*config.taus, config.tau})
    ps = sorted({*config.ps, config.p})
    headline_site = resolve_site(lm.model, analysis.site, analysis.layer)
    sites = {headline_site.name: headline_site}
    for layer in config.layers or []:
        site = resolve_site(lm.model, analysis.site, layer)
        sites.setdefault(site.name, site)
    train, test = np.asarray(capture.train), np.asarray(capture.test)
    labels = np.asarray(data.labels)
    seconds: dict[str, float] = {}
    bar = tqdm(total=0, desc="erasure", unit="forward", disable=not progress, leave=False)

    with torch.inference_mode(), bar:
        clock = time.perf_counter()
        task = _build_task(lm, data, capture, analysis, config, progress)
        train_pred = _unmasked_logp(lm, task, train, config.batch_size).argmax(axis=1)
        correct = train[train_pred == labels[train]]
        per_concept = {n: int((labels[correct] == c).sum()) for c, n in enumerate(data.label_names)}
        empty = [n for n, k in per_concept.items() if k == 0]
        if empty:
            raise RangelensError(
                f"task {config.task!r} classifies no training text of concept {empty[0]!r} "
                f"correctly (correct per concept: {per_concept}); ranges need correctly "
                f"classified examples: use more data or another task (valid: {choices(TASKS)})"
            )
        seconds["task"] = time.perf_counter() - clock

        clock = time.perf_counter()
        groups = []
        for site in sites.values():
            stats, feats = _concept_stats(
                lm, task, capture, site, correct, analysis, config.batch_size
            )
            scores = rank(analysis.ranking, stats, feats, labels[correct], seed=analysis.seed)
            conditions = _mask_conditions(site, stats, scores, concepts, taus, ps, config, analysis)
            groups.append(_Group(site, conditions))
        groups[0].conditions.insert(0, _Condition("base"))  # shares the headline site's prefix
        seconds["ranges"] = time.perf_counter() - clock

        clock = time.perf_counter()
        logps, classify_how = _classify(lm, task, test, groups, config, bar)
        seconds["classify"] = time.perf_counter() - clock
        clock = time.perf_counter()
        ppls, ppl_info = _perplexity(lm, groups, config, analysis.seed, bar)
        seconds["perplexity"] = time.perf_counter() - clock

    conditions = [c for g in groups for c in g.conditions]
    table = _table(
        conditions,
        logps,
        ppls,
        labels[test],
        data.label_names,
        concepts,
        list(sites.values()),
        taus,
        ps,
    )
    headline = headline_table(table, site=headline_site.name, tau=config.tau, p=config.p)
    base = id(groups[0].conditions[0])
    seconds["total"] = time.perf_counter() - started
    info: dict[str, Any] = {
        "task": config.task,
        "model": lm.name,
        "dataset": data.name,
        "task_info": task.info,
        "train_acc": float((train_pred == labels[train]).mean()),
        "test_acc": float((logps[base].argmax(axis=1) == labels[test]).mean()),
        "n_train": len(train),
        "n_test": len(test),
        "n_correct_train": len(correct),
        "n_correct_train_per_concept": per_concept,
        "sites": list(sites),
        "headline_site": headline_site.name,
        "concepts": [data.label_names[c] for c in concepts],
        "taus": taus,
        "ps": ps,
        "n_conditions": len(conditions),
        "suffix": config.suffix,
        "classify": classify_how,
        "perplexity": {"base": None if np.isnan(ppls[base]) else ppls[base], **ppl_info},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "sweep": _records(_sweep_summary(table, site=headline_site.name, p=config.p)),
    }
    result = ErasureResult(table, headline, info)
    _write(Path(out_dir), result, config, headline_site.name)
    return result


def load_erasure(directory: str | Path) -> ErasureResult:
    """Read back what :func:`run_erasure` wrote into ``directory``."""
    path = Path(directory) / "erasure.json"
    saved = read_json(path)
    if saved.get("format") != FORMAT_VERSION:
        raise RangelensError(
            f"{str(path)!r} has format {saved.get('format')!r}; valid: {FORMAT_VERSION!r}"
        )
    headline = pd.DataFrame(saved["headline"])
    numeric = [c for c in headline.columns if c != "concept"]
    headline[numeric] = headline[numeric].astype(float)  # null -> NaN
    table = pd.read_parquet(Path(directory) / "erasure.parquet")
    return ErasureResult(table, headline, saved["info"])

"""Classification tasks of the erasure experiment: what the model reads and how it classifies.

``head`` (the default: a linear head trained on a frozen site's pooled features, because small
models cannot classify these datasets by prompting), ``prompt`` (label-token scoring of an
instruction / few-shot prompt, for instruction-tuned LMs) and ``finetuned`` (the user's
``AutoModelForSequenceClassification``). A task is built once; :meth:`ClassificationTask.fit`
gives the classifier of one training split (only the head learns anything).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import nn

from rangelens.activations.capture import (
    capture,
    model_inputs,
    pool,
    record,
    stop_forward,
    tokenize,
)
from rangelens.activations.models import LoadedModel
from rangelens.activations.sites import NeuronSite, resolve_site
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.data import LabeledTexts
from rangelens.errors import RangelensError, choices
from rangelens.intervene import Edit
from rangelens.ranges.captured import CaptureResult

TASKS = ("head", "prompt", "finetuned")
Readout = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and the scales to divide by: the standard deviation, or 1 for a column that is
    constant up to rounding (std below 1e-6 of the largest). Dividing such a column by its
    rounding noise (1e-33 on MiniLM's CLS) would turn float error into a feature, e.g. let a
    probe read back a direction LEACE removed."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    floor = 1e-6 * float(std.max()) if std.size else 0.0
    return mean, np.where(std > floor, std, 1.0)


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
    mean, std = standardiser(x)
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


def covers(site: NeuronSite, position: str, mask: Edit | None) -> bool:
    """Whether an edit's effect on rows pooled at ``site`` / ``position`` is its effect on that
    one row (so it applies to cached pooled features instead of a forward)."""
    if mask is None:
        return True
    one_row = position not in ("mean", "tokens") and (mask.positions == "all" or position == "last")
    return mask.site.name == site.name and one_row


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

    def covers(self, mask: Edit | None) -> bool:
        """Whether :meth:`log_proba` gives the same result as a forward with ``mask``."""
        return covers(self.site, self.position, mask)

    def log_proba(self, rows: np.ndarray, mask: Edit | None = None) -> np.ndarray:
        return self.head.log_proba(edited(self.features[rows], mask)).numpy()


def edited(features: np.ndarray, mask: Edit | None) -> torch.Tensor:
    """Pooled rows ``(n, d)`` as a masked forward leaves them (see :meth:`PooledHead.covers`)."""
    x = torch.from_numpy(np.ascontiguousarray(features))
    return x if mask is None else mask.edit_rows(x)


@dataclass
class Classifier:
    """One training split's classifier: ``readout`` maps forward kwargs to ``(batch, C)`` class
    log-probabilities on the current model state; ``pooled`` classifies cached features."""

    readout: Readout
    pooled: PooledHead | None = None


@dataclass
class ClassificationTask:
    """What the model reads (``inputs``, one per data row) and how to get a classifier."""

    name: str
    inputs: list[str]
    max_length: int
    padding_side: str | None
    sites: list[NeuronSite]  # sites the readout records (they bound the skippable prefix)
    raw: bool  # inputs are the dataset texts themselves (so the analysis capture applies)
    info: dict[str, Any]
    fit: Callable[[np.ndarray], Classifier]  # training rows -> classifier
    reserved: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def has_lm_head(lm: LoadedModel) -> bool:
    return lm.kind == "decoder" and lm.model.get_output_embeddings() is not None


def _is_sequence_classifier(lm: LoadedModel) -> bool:
    return type(lm.model).__name__.endswith("ForSequenceClassification")


def _unfit(lm: LoadedModel, task: str, needs: str) -> RangelensError:
    fits = (True, has_lm_head(lm), _is_sequence_classifier(lm))
    valid = [t for t, ok in zip(TASKS, fits, strict=True) if ok]
    kind = "an encoder" if lm.kind == "encoder" else f"a {type(lm.model).__name__}"
    return RangelensError(
        f"task {task!r} needs {needs}; model {lm.name!r} is {kind}; valid tasks for it: "
        f"{choices(valid)}"
    )


def head_task(
    lm: LoadedModel,
    data: LabeledTexts,
    config: ErasureConfig,
    analysis: AnalysisConfig,
    cap: CaptureResult,
    *,
    progress: bool = False,
) -> ClassificationTask:
    """Task ``head``: a linear head fitted on the head site's pooled features of a training split.

    The features are the analysis capture's when the head site and position are the analysis ones,
    else captured once here.
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
            batch_size=analysis.batch_size,
            max_length=analysis.max_length,
            padding_side=analysis.padding_side,
            progress=progress,
        ).acts[site.name]
    model = lm.model

    def fit(train: np.ndarray) -> Classifier:
        head = fit_head(features[train], data.labels[train], len(data.label_names), C=config.head_C)

        def readout(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
            with record(model, [site]) as store, stop_forward():
                model(**kwargs)
            return head.log_proba(
                pool(store[site.name], kwargs["attention_mask"], position).float()
            )

        return Classifier(readout, PooledHead(site, position, features, head))

    return ClassificationTask(
        name="head",
        inputs=list(data.texts),
        max_length=analysis.max_length,
        padding_side=analysis.padding_side,
        sites=[site],
        raw=True,
        info={"site": site.name, "position": position, "C": config.head_C},
        fit=fit,
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
    prompt's ending is never truncated. Few-shot demonstrations are texts of ``train``, one class
    after another, fixed for every query; they are ``reserved`` (never evaluated). Prompts are
    left-padded, so the last column is the last token.
    """
    if not has_lm_head(lm):
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
    demos, reserved = [], []
    for k in range(config.few_shot):
        c = k % len(names)
        if not pools[c]:
            raise RangelensError(
                f"few_shot {config.few_shot} needs more training texts of {names[c]!r}; "
                f"valid: at most {len(names) * min(len(p) for p in pools)}"
            )
        i = int(pools[c].pop())
        reserved.append(i)
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
        sites=[],
        raw=False,
        info={
            "label_tokens": dict(zip(names, label_ids, strict=True)),
            "few_shot": config.few_shot,
        },
        fit=lambda _train: Classifier(readout),
        reserved=np.array(sorted(reserved), dtype=np.int64),
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
        sites=[],
        raw=True,
        info={"id2label": id2label},
        fit=lambda _train: Classifier(readout),
    )


def build_task(
    lm: LoadedModel,
    data: LabeledTexts,
    cap: CaptureResult,
    analysis: AnalysisConfig,
    config: ErasureConfig,
    progress: bool = False,
) -> ClassificationTask:
    if config.task == "prompt":
        return prompt_task(lm, data, cap.train, config, analysis)
    if config.task == "finetuned":
        return finetuned_task(lm, data, analysis)
    return head_task(lm, data, config, analysis, cap, progress=progress)


def unmasked_logp(
    lm: LoadedModel,
    task: ClassificationTask,
    classifier: Classifier,
    rows: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Class log-probabilities ``(len(rows), C)`` of ``rows`` without any mask."""
    if classifier.pooled is not None:
        return classifier.pooled.log_proba(rows)
    parts = []
    texts = [task.inputs[i] for i in rows]
    for batch in tokenize(
        lm, texts, batch_size=batch_size, max_length=task.max_length, padding_side=task.padding_side
    ):
        with torch.inference_mode():
            logits = classifier.readout(model_inputs(lm.model, batch))
        parts.append((batch.index, logits.cpu().numpy()))
    out = np.zeros((len(rows), parts[0][1].shape[1]))
    for index, values in parts:
        out[index] = values
    return out


def token_nll(model: nn.Module, kwargs: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a batch: summed next-token NLL over its real tokens, and how many tokens were
    predicted (the loss ``labels=`` computes, with padding ignored)."""
    logits = model(**kwargs).logits
    mask = kwargs["attention_mask"].bool()
    valid = mask[:, :-1] & mask[:, 1:]
    targets = kwargs["input_ids"][:, 1:][valid]
    nll = nn.functional.cross_entropy(logits[:, :-1][valid].float(), targets, reduction="none")
    rows = valid.nonzero()[:, 0]
    sums = torch.zeros(valid.shape[0], dtype=torch.float64, device=nll.device)
    sums.index_add_(0, rows, nll.double())
    return sums.cpu().numpy(), valid.sum(dim=1).cpu().numpy()

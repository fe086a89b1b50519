"""The erasure protocol: repeated stratified k-fold splits, and the rows each split's ranges are
fitted on (its correctly classified training rows, or all of them).

NeuronLens (Haider et al., arXiv 2502.06809) fits ranges on the correctly classified training
examples and reports one train/test split; here every text is a test text once per repeat, so
per-concept figures rest on every text of the concept, and each fold's classifier and ranges see
only that fold's training rows. The ``full`` split (the analysis train/test split) gives the range
map the atlas shows and the perplexity conditions use.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold

from rangelens.activations.models import LoadedModel
from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.data import LabeledTexts
from rangelens.erasure.tasks import (
    TASKS,
    ClassificationTask,
    Classifier,
    build_task,
    has_lm_head,
    unmasked_logp,
)
from rangelens.errors import RangelensError, choices
from rangelens.ranges.captured import CaptureResult
from rangelens.ranges.splits import FULL, Split, Splits

# What the splits depend on besides the analysis config (enters the splits stage's fingerprint).
SPLIT_INPUTS = (
    "task",
    "range_rows",
    "folds",
    "repeats",
    "head_C",
    "head_site",
    "head_layer",
    "head_position",
    "prompt_template",
    "few_shot",
)


def check_protocol(
    data: LabeledTexts, config: ErasureConfig, lm: LoadedModel | None = None
) -> list[int]:
    """Checks that need only the data (and the model's kind): concepts, folds against the smallest
    class, perplexity without an LM head. Returns the indices of the concepts to erase."""
    for name in config.targets or []:
        if name not in data.label_names:
            raise RangelensError(
                f"concept {name!r} not in dataset {data.name!r}; valid: {choices(data.label_names)}"
            )
    counts = np.bincount(data.labels, minlength=len(data.label_names))
    smallest = int(counts.argmin())
    if config.folds > counts[smallest]:
        raise RangelensError(
            f"folds {config.folds} > the {counts[smallest]} texts of the smallest class "
            f"{data.label_names[smallest]!r}; valid: folds 2..{max(2, counts[smallest])} "
            f"(or more texts per class)"
        )
    explicit = "ppl_texts" in config.model_fields_set and config.ppl_texts > 0
    if lm is not None and explicit and not has_lm_head(lm):
        raise RangelensError(
            f"ppl_texts = {config.ppl_texts}: perplexity needs a decoder with an LM head and model "
            f"{lm.name!r} has none; valid for it: ppl_texts = 0"
        )
    return [data.label_names.index(n) for n in dict.fromkeys(config.targets or data.label_names)]


def make_folds(
    labels: np.ndarray, rows: np.ndarray, folds: int, repeats: int, seed: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, train, test)`` of each fold of a repeated stratified k-fold over ``rows``."""
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    out = []
    for i, (train, test) in enumerate(splitter.split(rows, labels[rows])):
        r, k = divmod(i, folds)
        name = f"fold{k}" if repeats == 1 else f"fold{r}.{k}"
        out.append((name, np.sort(rows[train]), np.sort(rows[test])))
    return out


class ErasureProtocol:
    """The task, the splits and each split's classifier, built once for the ranges stage and the
    experiment (:meth:`plan` hands the ranges stage its rows)."""

    def __init__(
        self,
        lm: LoadedModel,
        data: LabeledTexts,
        analysis: AnalysisConfig,
        config: ErasureConfig,
        *,
        progress: bool = False,
    ) -> None:
        self.lm, self.data, self.analysis, self.config = lm, data, analysis, config
        self.progress = progress
        self.concepts = check_protocol(data, config, lm)
        self._task: ClassificationTask | None = None
        self._classifiers: dict[str, Classifier] = {}
        self.correct_share: dict[str, float] = {}

    def task(self, cap: CaptureResult) -> ClassificationTask:
        if self._task is None:
            self._task = build_task(
                self.lm, self.data, cap, self.analysis, self.config, self.progress
            )
        return self._task

    def classifier(self, cap: CaptureResult, split: Split) -> Classifier:
        if split.name not in self._classifiers:
            self._classifiers[split.name] = self.task(cap).fit(split.train)
        return self._classifiers[split.name]

    def splits(self, cap: CaptureResult) -> Splits:
        """The ``full`` split and every fold, each with the rows its ranges are fitted on, and what
        the ranges read (the task's inputs when they are not the dataset texts)."""
        task = self.task(cap)
        labels = self.data.labels
        rows = np.setdiff1d(np.arange(len(labels)), task.reserved)
        raw = [(FULL, cap.train, cap.test)]
        raw += make_folds(labels, rows, self.config.folds, self.config.repeats, self.analysis.seed)
        out = []
        for name, train, test in raw:
            split = Split(name, train, test, train, "all training rows")
            if self.config.range_rows == "correct":
                pred = unmasked_logp(
                    self.lm, task, self.classifier(cap, split), train, self.analysis.batch_size
                ).argmax(axis=1)
                correct = pred == labels[train]
                self.correct_share[name] = float(correct.mean())
                split.fit = train[correct]
                split.rows = f"correctly classified training rows (task {task.name})"
                self._check_correct(split, name)
            out.append(split)
        info = {"task": task.name, "correct_share": self.correct_share}
        inputs = None if task.raw else list(task.inputs)
        return Splits(out, inputs, task.max_length, task.padding_side, info)

    def _check_correct(self, split: Split, name: str) -> None:
        names = self.data.label_names
        per_concept = {
            n: int((self.data.labels[split.fit] == c).sum()) for c, n in enumerate(names)
        }
        empty = [n for n, k in per_concept.items() if k == 0]
        if empty:
            raise RangelensError(
                f"task {self.config.task!r} classifies no training text of concept {empty[0]!r} "
                f"correctly in split {name} (correct per concept: {per_concept}); ranges need "
                f"correctly classified examples: use more data, range_rows 'all' or another task "
                f"(valid: {choices(TASKS)})"
            )

"""The information question of erasure: after an edit, can a probe *retrained* on edited training
rows still read the concept from edited test rows? (The behaviour question, whether the frozen head
still reads it, is the experiment's target accuracy drop.)

Probes are fitted per fold on the training rows' pooled features at the masked site, each edited
as the masked forward leaves them (:func:`rangelens.erasure.tasks.edited`; no forward needed), and
predict that fold's test rows: ``linear`` is the head's own family (standardised multinomial
logistic regression, same ``C``), ``binary`` a class-balanced logistic regression of the concept
against the rest (the probe LEACE's guarantee is about), ``mlp`` a small scikit-learn ``MLPClassifier`` (one hidden layer
of 64 ReLU units, L-BFGS). Their predictions enter the same bootstrap as every other figure; from them
:meth:`~rangelens.erasure.metrics.EffectEstimator.information` gives the target recall and the
concept-vs-rest balanced accuracy. Also recorded per edit: the mean L2 norm of the change of a
test row and the number of dimensions the edit touches (neurons masked; LEACE: its rank).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from rangelens.activations.sites import NeuronSite
from rangelens.erasure.metrics import Key, base_key
from rangelens.erasure.tasks import Classifier, covers, edited, fit_head, standardiser
from rangelens.intervene import Edit
from rangelens.ranges.captured import CaptureResult

PROBES = ("linear", "binary", "mlp")
__all__ = [
    "PROBES",
    "FoldInformation",
    "covers",
    "fold_information",
    "probe_predict",
    "site_features",
]
MLP_HIDDEN = 64
MLP_ITERATIONS = 200  # L-BFGS, full batch: deterministic and quick on a few hundred rows


def site_features(
    classifier: Classifier, cap: CaptureResult, site: NeuronSite, position: str
) -> tuple[np.ndarray, str] | None:
    """Pooled features of every data row at ``site`` (the head's, or the analysis capture's), and
    their position; None when neither was recorded there."""
    pooled = classifier.pooled
    if pooled is not None and pooled.site.name == site.name:
        return pooled.features, pooled.position
    if cap.features is not None and cap.info.get("site") == site.name:
        return np.asarray(cap.features, dtype=np.float32), position
    return None


def probe_predict(
    kind: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    n_classes: int,
    *,
    C: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Predicted classes of ``test_x`` by a ``kind`` probe fitted on ``(train_x, train_y)``."""
    if kind == "linear":
        head = fit_head(train_x, train_y, n_classes, C=C)
        return np.asarray(head.log_proba(test_x).numpy().argmax(axis=1))
    if kind.startswith("binary:"):  # concept c vs rest: LEACE's own guarantee is about this probe
        c = int(kind.split(":")[1])
        x = np.asarray(train_x, dtype=np.float64)
        mean, std = standardiser(x)
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit((x - mean) / std, train_y == c)
        hit = clf.predict((np.asarray(test_x, dtype=np.float64) - mean) / std)
        return np.where(hit, c, -1)
    x = np.asarray(train_x, dtype=np.float64)
    mean, std = standardiser(x)
    mlp = MLPClassifier(
        (MLP_HIDDEN,), solver="lbfgs", alpha=1e-3, max_iter=MLP_ITERATIONS, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit((x - mean) / std, train_y)
    return np.asarray(mlp.predict((np.asarray(test_x, dtype=np.float64) - mean) / std))


@dataclass
class FoldInformation:
    """One fold's information figures: per ``(probe, key)`` the test rows' predictions, per key the
    L2 norm of each test row's change and the dimensions the edit touches."""

    pred: dict[tuple[str, Key], np.ndarray] = field(default_factory=dict)
    norm: dict[Key, np.ndarray] = field(default_factory=dict)
    dims: dict[Key, int] = field(default_factory=dict)


def fold_information(
    features: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    masks: dict[Key, Edit | None],
    probes: list[str],
    *,
    n_classes: int,
    C: float,
    seed: int,
) -> FoldInformation:
    """Refit every probe on each edit's training rows; predict its test rows (see module doc)."""
    out = FoldInformation()
    with threadpool_limits(1):  # small fits: BLAS threads only contend (20x slower on 2 cores)
        for key, mask in masks.items():
            train_x = edited(features[train], mask).numpy()
            test_raw = features[test]
            test_x = edited(test_raw, mask).numpy()
            out.norm[key] = np.linalg.norm(test_x.astype(np.float64) - test_raw, axis=1)
            out.dims[key] = 0 if mask is None else mask.dimensions
            for kind in probes:
                for probe, at in _probes(kind, key, n_classes):
                    out.pred[(kind, at)] = probe_predict(
                        probe, train_x, labels[train], test_x, n_classes, C=C, seed=seed
                    )
    return out


def _probes(kind: str, key: Key, n_classes: int) -> list[tuple[str, Key]]:
    """The probes ``kind`` fits for ``key`` and the key each one's predictions are kept under:
    ``binary`` is one concept-vs-rest probe per concept (the key's, or every concept at base)."""
    if kind != "binary":
        return [(kind, key)]
    if key[1] is not None:
        return [(f"binary:{int(key[1])}", key)]
    return [(f"binary:{c}", base_key(c)) for c in range(n_classes)]

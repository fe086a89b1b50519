"""Rank neurons by salience for each concept, with one interface for every method (as in NeuroX).

Every ranker maps per-concept statistics (and, for the probe, raw activations) to a ``(C, d)`` array
of salience scores, higher = more salient for that concept; :func:`top_neurons` turns scores into
the salient-neuron sets that NeuronLens (Haider et al., arXiv 2502.06809) fits ranges on.
"""

from __future__ import annotations

import warnings
from typing import Any, get_args

import numpy as np

from rangelens.config.analysis import Ranking
from rangelens.errors import RangelensError, choices
from rangelens.ranges.stats import ConceptStats

RANKING_METHODS = get_args(Ranking)  # declared once, in the config


def rank(
    method: str,
    stats: ConceptStats,
    features: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Salience scores ``(C, d)`` of every neuron for every concept in ``stats``, by ``method``.

    ``features`` ``(n, d)`` and integer ``labels`` ``(n,)`` (indices into ``stats.concepts``) are
    only needed by ``"probe"``; ``seed`` makes the probe deterministic. Concepts without rows score
    0 under every method.
    """
    if method == "mean_abs":
        return mean_abs_scores(stats)
    if method == "probeless":
        return probeless_scores(stats)
    if method == "dprime":
        return dprime_scores(stats)
    if method == "probe":
        if features is None or labels is None:
            raise RangelensError(
                "ranking method 'probe' needs features (n, d) and labels (n,); methods that "
                f"need only stats: {choices(m for m in RANKING_METHODS if m != 'probe')}"
            )
        if np.shape(features)[-1] != stats.n_neurons:
            raise RangelensError(
                f"probe features have shape {np.shape(features)}; expected (n, {stats.n_neurons})"
            )
        return probe_scores(features, labels, len(stats.concepts), seed=seed)
    raise RangelensError(f"unknown ranking method {method!r}; valid: {choices(RANKING_METHODS)}")


def mean_abs_scores(stats: ConceptStats) -> np.ndarray:
    """Mean |activation| over each concept's rows: the NeuronLens reference code's ranking."""
    return np.asarray(stats.mean_abs, dtype=np.float64)


def probeless_scores(stats: ConceptStats) -> np.ndarray:
    """Probeless ranking (Antverg & Belinkov 2022, "On the pitfalls of analyzing individual neurons
    in language models").

    Score of neuron j for concept c: ``sum over c' != c of |mu_cj - mu_c'j|``, i.e. how far the
    concept's mean sits from every other concept's mean, with no probe to overfit. Concepts without
    rows score 0 and are skipped as comparison partners.
    """
    mean = np.asarray(stats.mean, dtype=np.float64)
    present = np.asarray(stats.count) > 0
    scores: np.ndarray = np.abs(mean[:, None, :] - mean[None, present, :]).sum(axis=1)
    scores[~present] = 0.0
    return scores


def dprime_scores(stats: ConceptStats) -> np.ndarray:
    """Separability d' = ``|mu_c - mu_rest| / sqrt((sigma_c^2 + sigma_rest^2) / 2)`` per concept.

    ``rest`` is every row not of concept c (``stats.complement``). A zero denominator gives 0 when
    the means are equal; when they differ, the denominator is floored at ``eps * (|mu_c| +
    |mu_rest|)``, so perfectly separated point masses score large (at most ``1 / eps``, about
    4.5e15) but finite. Concepts without rows score 0.
    """
    mean = np.asarray(stats.mean, dtype=np.float64)
    std = np.asarray(stats.std, dtype=np.float64)
    scores = np.empty_like(mean)
    eps = np.finfo(np.float64).eps
    for c in range(len(stats.concepts)):
        rest_mean, rest_std = stats.complement(c)
        gap = np.abs(mean[c] - rest_mean)
        spread = np.sqrt((std[c] ** 2 + rest_std**2) / 2.0)
        floor = eps * (np.abs(mean[c]) + np.abs(rest_mean))
        with np.errstate(divide="ignore", invalid="ignore"):
            scores[c] = np.where(gap == 0.0, 0.0, gap / np.maximum(spread, floor))
    scores[np.asarray(stats.count) == 0] = 0.0
    return scores


def probe_scores(
    features: np.ndarray,
    labels: np.ndarray,
    n_concepts: int,
    *,
    seed: int = 0,
    C: float = 0.1,
    l1_ratio: float = 0.5,
    max_iter: int = 100,
) -> np.ndarray:
    """Elastic-net probe ranking (Dalvi et al. 2019, "What is one grain of sand in the desert?
    Analyzing individual neurons in deep NLP models"; NeuroX).

    Fits a multinomial logistic regression with an elastic-net penalty on standardised features
    (saga solver, seeded, at most ``max_iter`` epochs; a non-converged fit is still a usable
    ranking, so the ConvergenceWarning is silenced) and scores neuron j for concept c by ``|w_cj|``.
    With two concepts both share the single weight vector; a concept absent from ``labels`` scores 0
    everywhere.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise RangelensError(
            f"probe needs features (n, d) and labels (n,); got {x.shape} and {y.shape}"
        )
    if (
        not np.issubdtype(y.dtype, np.integer)
        or y.min(initial=0) < 0
        or y.max(initial=0) >= n_concepts
    ):
        raise RangelensError(
            f"probe labels must be integers in [0, {n_concepts}); got {y.dtype} values "
            f"{y.min(initial=0)}..{y.max(initial=0)}"
        )
    present = np.unique(y)
    if present.size < 2:
        raise RangelensError(f"probe needs rows of at least 2 concepts; got {present.tolist()}")
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(
        C=C, solver="saga", max_iter=max_iter, tol=1e-3, random_state=seed, **_elastic_net(l1_ratio)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    weights = np.abs(model.coef_)
    if weights.shape[0] == 1:  # binary problem: one weight vector separates both concepts
        weights = np.repeat(weights, 2, axis=0)
    scores = np.zeros((n_concepts, x.shape[1]))
    scores[model.classes_] = weights
    return scores


def _elastic_net(l1_ratio: float) -> dict[str, Any]:
    """LogisticRegression arguments for elastic net (scikit-learn 1.8 deprecated ``penalty``)."""
    import sklearn

    if tuple(int(part) for part in sklearn.__version__.split(".")[:2]) >= (1, 8):
        return {"l1_ratio": l1_ratio}
    return {"penalty": "elasticnet", "l1_ratio": l1_ratio}


def top_neurons(scores: np.ndarray, p: float) -> np.ndarray:
    """Indices ``(C, k)`` of each concept's top ``k = max(1, round(p * d))`` neurons, best first.

    Ties keep the lower neuron index first (stable sort), so the selection is deterministic.
    """
    if not 0.0 < p <= 1.0:
        raise RangelensError(f"p must be in (0, 1]; got {p!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise RangelensError(f"scores must be (C, d); got shape {scores.shape}")
    k = max(1, round(p * scores.shape[1]))
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def polysemanticity(top: np.ndarray) -> np.ndarray:
    """Share ``(C,)`` of each concept's salient neurons that are also salient for another concept.

    NeuronLens reports salient neurons as heavily shared across concepts (polysemantic); this
    measures it.
    """
    top = np.asarray(top, dtype=np.int64)
    if top.ndim != 2 or top.size == 0:
        raise RangelensError(f"top must be a non-empty (C, k) index array; got shape {top.shape}")
    member = np.zeros((top.shape[0], int(top.max()) + 1), dtype=bool)
    member[np.arange(top.shape[0])[:, None], top] = True
    n_concepts_per_neuron = member.sum(axis=0)
    shared: np.ndarray = (n_concepts_per_neuron[top] > 1).mean(axis=1)
    return shared

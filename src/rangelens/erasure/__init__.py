"""The NeuronLens erasure experiment (Haider et al., arXiv 2502.06809), one job per module:

- options: :class:`rangelens.config.ErasureConfig`; :mod:`~rangelens.erasure.conditions`: the masked states;
- :mod:`~rangelens.erasure.engine`: suffix-only forwards (all hook code of the experiment);
- :mod:`~rangelens.erasure.tasks`: the classification tasks and the perplexity NLL;
- :mod:`~rangelens.erasure.protocol`: the task, k-fold splits and the rows each split's ranges are
  fitted on;
- :mod:`~rangelens.erasure.metrics`: effect estimates with bootstrap intervals and the verdict;
- :mod:`~rangelens.erasure.plots`: the erasure figures;
- :mod:`~rangelens.erasure.experiment`: :func:`run_erasure`; :mod:`~rangelens.erasure.outputs`: files.
"""

from __future__ import annotations

from rangelens.lazy import lazy_members

_WHERE = {
    "ErasureConfig": "rangelens.config.erasure",
    "erasure_ranges": "rangelens.erasure.experiment",
    "run_erasure": "rangelens.erasure.experiment",
    "FORMAT_VERSION": "rangelens.erasure.outputs",
    "ErasureResult": "rangelens.erasure.outputs",
    "load_erasure": "rangelens.erasure.outputs",
    "ErasureProtocol": "rangelens.erasure.protocol",
}


__getattr__ = lazy_members(__name__, _WHERE)

__all__ = [
    "FORMAT_VERSION",
    "ErasureConfig",
    "ErasureProtocol",
    "ErasureResult",
    "erasure_ranges",
    "load_erasure",
    "run_erasure",
]

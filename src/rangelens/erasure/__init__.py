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

from rangelens.config.erasure import ErasureConfig
from rangelens.erasure.experiment import erasure_ranges, run_erasure
from rangelens.erasure.outputs import FORMAT_VERSION, ErasureResult, load_erasure
from rangelens.erasure.protocol import ErasureProtocol

__all__ = [
    "FORMAT_VERSION",
    "ErasureConfig",
    "ErasureProtocol",
    "ErasureResult",
    "erasure_ranges",
    "load_erasure",
    "run_erasure",
]

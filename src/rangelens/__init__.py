"""rangelens: which activation ranges of which neurons carry a concept, and what each range means.

Implements NeuronLens (Haider et al., "Neurons Speak in Ranges", arXiv 2502.06809) range attribution and
interventions, and NeuronScope (Liu et al., arXiv 2601.03671) iterative mode-level explanations, through
hooks on stock `transformers` models.

The public API is what ``rangelens.__all__`` lists (documented in ``docs/API.md``); members are imported
on first use, so ``import rangelens`` does not load torch::

    import rangelens as rl

    lm = rl.load_model("smollm2-135m")
    result = rl.analyze(rl.AnalysisConfig(dataset="bbc-news", max_per_class=50), "runs/bbc")
    site = rl.resolve_site(lm.model, "resid", -1)
    mask = rl.RangeMask.from_range_map(site, result.range_map, "sports")

Everything else (``rangelens.<package>.<module>``) is internal and may change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rangelens.errors import RangelensError
from rangelens.lazy import lazy_members

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first use, PEP 562).
_MEMBERS = {
    # models, sites, activations
    "load_model": "rangelens.activations.models",
    "LoadedModel": "rangelens.activations.models",
    "resolve_site": "rangelens.activations.sites",
    "tokenize": "rangelens.activations.capture",
    "model_inputs": "rangelens.activations.capture",
    "capture": "rangelens.activations.capture",
    "Trace": "rangelens.activations.hooks",
    "load_texts": "rangelens.data",
    # configuration
    "AnalysisConfig": "rangelens.config.analysis",
    "ErasureConfig": "rangelens.config.erasure",
    "ExplainConfig": "rangelens.config.explain",
    "RunConfig": "rangelens.config.run",
    "load_config": "rangelens.config.run",
    # ranges
    "RangeMap": "rangelens.ranges.maps",
    "ConceptStats": "rangelens.ranges.stats",
    # interventions, output side, steering
    "RangeMask": "rangelens.intervene.masks",
    "NeuronMask": "rangelens.intervene.masks",
    "density_mask": "rangelens.intervene.density",
    "neuron_logits": "rangelens.intervene.logits",
    "next_token_shift": "rangelens.intervene.logits",
    "RangeSteer": "rangelens.intervene.steer",
    "DirectionSteer": "rangelens.intervene.steer",
    "generate": "rangelens.intervene.steer",
    # explanations, atlas
    "explain_neurons": "rangelens.explain.api",
    "build_atlas": "rangelens.report.atlas",
    # whole runs
    "analyze": "rangelens.pipeline.run",
    "run": "rangelens.pipeline.run",
    "load_analysis": "rangelens.pipeline.run",
    "explain_run": "rangelens.pipeline.run",
    "effects": "rangelens.pipeline.tables",
    "steer_run": "rangelens.pipeline.steering",
    "export_run": "rangelens.pipeline.export",
    "load_export": "rangelens.pipeline.export",
}

__all__ = [
    "RangelensError",
    "__version__",
    "load_model",
    "LoadedModel",
    "resolve_site",
    "tokenize",
    "model_inputs",
    "capture",
    "Trace",
    "load_texts",
    "AnalysisConfig",
    "ErasureConfig",
    "ExplainConfig",
    "RunConfig",
    "load_config",
    "RangeMap",
    "ConceptStats",
    "RangeMask",
    "NeuronMask",
    "density_mask",
    "neuron_logits",
    "next_token_shift",
    "RangeSteer",
    "DirectionSteer",
    "generate",
    "explain_neurons",
    "build_atlas",
    "analyze",
    "run",
    "load_analysis",
    "explain_run",
    "effects",
    "steer_run",
    "export_run",
    "load_export",
]

__getattr__ = lazy_members(__name__, _MEMBERS)


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time members load lazily
    from rangelens.activations.capture import capture, model_inputs, tokenize
    from rangelens.activations.hooks import Trace
    from rangelens.activations.models import LoadedModel, load_model
    from rangelens.activations.sites import resolve_site
    from rangelens.config.analysis import AnalysisConfig
    from rangelens.config.erasure import ErasureConfig
    from rangelens.config.explain import ExplainConfig
    from rangelens.config.run import RunConfig, load_config
    from rangelens.data import load_texts
    from rangelens.explain.api import explain_neurons
    from rangelens.intervene.density import density_mask
    from rangelens.intervene.logits import neuron_logits, next_token_shift
    from rangelens.intervene.masks import NeuronMask, RangeMask
    from rangelens.intervene.steer import DirectionSteer, RangeSteer, generate
    from rangelens.pipeline.export import export_run, load_export
    from rangelens.pipeline.run import analyze, explain_run, load_analysis, run
    from rangelens.pipeline.steering import steer_run
    from rangelens.pipeline.tables import effects
    from rangelens.ranges.maps import RangeMap
    from rangelens.ranges.stats import ConceptStats
    from rangelens.report.atlas import build_atlas

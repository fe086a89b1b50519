"""The one configuration layer: every option of every command is declared once, here, as a field
of a pydantic model with its default and help. The YAML run config, the Python API and the CLI
(generated from these models by :mod:`rangelens.cli.options`) all read the same declarations."""

from rangelens.config.analysis import AnalysisConfig, CaptureOptions, RangeOptions, Runtime
from rangelens.config.erasure import ErasureConfig
from rangelens.config.explain import ExplainConfig, ExplainInputs, LLMOptions
from rangelens.config.report import Output, ReportOptions, ServeOptions
from rangelens.config.run import RunConfig, example_config, load_config
from rangelens.config.sources import DataSource, ModelSource

__all__ = [
    "AnalysisConfig",
    "CaptureOptions",
    "DataSource",
    "ErasureConfig",
    "ExplainConfig",
    "ExplainInputs",
    "LLMOptions",
    "ModelSource",
    "Output",
    "RangeOptions",
    "ReportOptions",
    "RunConfig",
    "Runtime",
    "ServeOptions",
    "example_config",
    "load_config",
]

"""Mode-level neuron explanations: NeuronScope (Liu et al., arXiv 2601.03671) with range-aware
modes, scored as in "Language models can explain neurons in language models" (Bills et al. 2023)."""

from rangelens.explain.api import (
    BACKENDS,
    explain_neurons,
    explain_range,
    explain_records,
    make_roles,
    save_results,
)
from rangelens.explain.clients import (
    LLM,
    LLMClient,
    LLMUnavailable,
    OpenAIClient,
    ResponseCache,
    TransformersClient,
)
from rangelens.explain.exemplars import ExemplarConfig, build_records, records_from_activations
from rangelens.explain.loop import NeuronExplanation, explain_record
from rangelens.explain.protocol import MethodScores
from rangelens.explain.records import ActivationRecord, NeuronRecord
from rangelens.explain.roles import Component, Mode, Roles
from rangelens.explain.scoring import correlation, detection, score_records

__all__ = [
    "BACKENDS",
    "LLM",
    "ActivationRecord",
    "Component",
    "ExemplarConfig",
    "LLMClient",
    "LLMUnavailable",
    "MethodScores",
    "Mode",
    "NeuronExplanation",
    "NeuronRecord",
    "OpenAIClient",
    "ResponseCache",
    "Roles",
    "TransformersClient",
    "build_records",
    "correlation",
    "detection",
    "explain_neurons",
    "explain_range",
    "explain_record",
    "explain_records",
    "make_roles",
    "records_from_activations",
    "save_results",
    "score_records",
]

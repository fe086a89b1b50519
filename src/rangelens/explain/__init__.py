"""Mode-level neuron explanations: NeuronScope (Liu et al., arXiv 2601.03671) with range-aware
modes, scored as in "Language models can explain neurons in language models" (Bills et al. 2023).

Names are imported on first use, so reading saved explanations does not load torch or openai."""

from __future__ import annotations

from rangelens.lazy import lazy_members

_WHERE = {
    "ActivationRecord": "rangelens.explain.records",
    "BACKENDS": "rangelens.explain.api",
    "Component": "rangelens.explain.roles",
    "ExemplarConfig": "rangelens.explain.exemplars",
    "LLM": "rangelens.explain.clients",
    "LLMClient": "rangelens.explain.clients",
    "LLMUnavailable": "rangelens.explain.clients",
    "MethodScores": "rangelens.explain.evaluation",
    "Mode": "rangelens.explain.roles",
    "NeuronExplanation": "rangelens.explain.loop",
    "NeuronRecord": "rangelens.explain.records",
    "OpenAIClient": "rangelens.explain.clients",
    "ResponseCache": "rangelens.explain.clients",
    "Roles": "rangelens.explain.roles",
    "TransformersClient": "rangelens.explain.clients",
    "build_records": "rangelens.explain.exemplars",
    "correlation": "rangelens.explain.scoring",
    "detection": "rangelens.explain.scoring",
    "explain_neurons": "rangelens.explain.api",
    "explain_range": "rangelens.explain.api",
    "explain_record": "rangelens.explain.loop",
    "explain_records": "rangelens.explain.api",
    "make_roles": "rangelens.explain.api",
    "records_from_activations": "rangelens.explain.exemplars",
    "save_results": "rangelens.explain.results",
    "score_records": "rangelens.explain.scoring",
}


__getattr__ = lazy_members(__name__, _WHERE)

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

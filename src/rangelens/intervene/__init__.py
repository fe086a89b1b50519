"""NeuronLens interventions: range masking and neuron masking through hooks on stock models.

Haider et al., "Neurons Speak in Ranges" (arXiv 2502.06809): at a site, each salient neuron of a
concept is replaced by a value *only while its activation lies inside the concept's range*
``[lo, hi]`` (:class:`RangeMask`); the neuron-masking baseline replaces it whatever its value
(:class:`NeuronMask`, tau = infinity). Masks are context managers over forward hooks, removed on
exit even if the forward raises, and compose: nest several ``attach`` blocks, or build one mask
over several concepts::

    site = resolve_site(lm.model, "resid", -1)
    mask = RangeMask.from_range_map(site, ranges, ["sports", "world"],
                                    stats=stats, replacement="mean")
    with mask.attach(lm.model):
        logits = lm.model(**model_inputs(lm.model, batch)).logits

:func:`apply_ranges` is the pure tensor function the hooks run, for use on cached activations;
:func:`attach_stacked` runs several edits in one forward, each on its own row slice of a batch that
stacks copies of the same texts.
"""

from rangelens.intervene.apply import apply_ranges
from rangelens.intervene.leace import LeaceEdit
from rangelens.intervene.masks import NeuronMask, RangeMask
from rangelens.intervene.stack import attach_stacked

Edit = RangeMask | LeaceEdit  # an edit of a forward at one site (erasure conditions build these)

__all__ = ["Edit", "LeaceEdit", "NeuronMask", "RangeMask", "apply_ranges", "attach_stacked"]

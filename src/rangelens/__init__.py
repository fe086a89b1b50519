"""rangelens: which activation ranges of which neurons carry a concept, and what each range means.

Implements NeuronLens (Haider et al., "Neurons Speak in Ranges", arXiv 2502.06809) range attribution and
interventions, and NeuronScope (Liu et al., arXiv 2601.03671) iterative mode-level explanations, through
hooks on stock `transformers` models.
"""

from rangelens.errors import RangelensError

__version__ = "0.1.0"

__all__ = ["RangelensError", "__version__"]

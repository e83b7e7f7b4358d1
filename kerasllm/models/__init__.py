"""kerasllm models: backbones with task heads for the three transformer families."""

from kerasllm.models.base import SparseCrossEntropy, TransformerModel, default_optimizer
from kerasllm.models.causal_lm import CausalLM
from kerasllm.models.encoder import Encoder, MaskedLM, TextClassifier, TokenClassifier

__all__ = ["CausalLM", "Encoder", "MaskedLM", "TextClassifier", "TokenClassifier", "SparseCrossEntropy", "TransformerModel", "default_optimizer"]

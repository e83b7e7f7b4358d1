"""kerasllm models: backbones with task heads for the three transformer families."""

from kerasllm.models.base import SparseCrossEntropy, TransformerModel, default_optimizer
from kerasllm.models.causal_lm import CausalLM

__all__ = ["CausalLM", "SparseCrossEntropy", "TransformerModel", "default_optimizer"]

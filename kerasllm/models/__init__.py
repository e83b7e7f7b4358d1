"""kerasllm models: backbones with task heads for the three transformer families."""

from kerasllm import keras_backend_problem

if keras_backend_problem():  # before keras loads another backend's package ("No module named 'jax'")
    raise ImportError(keras_backend_problem())

from kerasllm.models.base import SparseCrossEntropy, TransformerModel, default_optimizer
from kerasllm.models.causal_lm import CausalLM
from kerasllm.models.encoder import Encoder, MaskedLM, TextClassifier, TokenClassifier
from kerasllm.models.seq2seq import Seq2SeqLM

__all__ = ["CausalLM", "Encoder", "MaskedLM", "Seq2SeqLM", "TextClassifier", "TokenClassifier", "SparseCrossEntropy", "TransformerModel", "default_optimizer"]

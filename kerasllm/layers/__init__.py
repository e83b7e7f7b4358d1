"""Keras layers shared by the encoder, decoder and encoder-decoder families."""

from kerasllm import keras_backend_problem

if keras_backend_problem():  # before keras loads another backend's package ("No module named 'jax'")
    raise ImportError(keras_backend_problem())

from kerasllm.layers.attention import MultiHeadAttention, attention_bias
from kerasllm.layers.block import TransformerBlock
from kerasllm.layers.embedding import TokenAndPositionEmbedding, sinusoidal_encoding
from kerasllm.layers.feedforward import FeedForward

__all__ = ["MultiHeadAttention", "attention_bias", "TransformerBlock", "TokenAndPositionEmbedding",
           "sinusoidal_encoding", "FeedForward"]

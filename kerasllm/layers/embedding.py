"""Token embeddings plus position information (learned, sinusoidal or rotary).

Positions are passed explicitly as `[B, T]` ids rather than derived from the
sequence length, so a decode step at position `P` and left-padded batches both get
the right positions. With `position="rotary"` this layer adds nothing and the
attention layers rotate queries and keys instead.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kerasllm.config import POSITION_KINDS


def sinusoidal_encoding(positions, width, max_wavelength=10000.0):
    """Sine/cosine encoding of `[B, T]` positions -> `[B, T, C]`, in tensor2tensor's layout
    (`get_timing_signal_1d`, as the Transformer's reference code wrote it): the sines in the first
    half of the channels and the cosines in the second, at wavelengths geometric from 2 pi to
    `max_wavelength` over each half (`10000 ** (-i / (C/2 - 1))`). The paper's formula interleaves
    sines and cosines at `10000 ** (-2i / C)`; both are fixed encodings of the same kind, but the
    numbers differ, so a model trained with one is not a model of the other."""
    half = width // 2
    exponents = ops.arange(half, dtype="float32") * (-math.log(max_wavelength) / max(half - 1, 1))
    angles = ops.cast(positions, "float32")[..., None] * ops.exp(exponents)[None, None, :]
    encoding = ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)
    if width % 2:
        encoding = ops.pad(encoding, [[0, 0], [0, 0], [0, 1]])
    return encoding


def check_position(position):
    """`position` if this layer knows it, else ValueError naming the kinds it does (the configs' rule)."""
    if position not in POSITION_KINDS:
        raise ValueError(f"unknown position {position!r}: expected one of "
                         f"{', '.join(repr(name) for name in POSITION_KINDS)}")
    return position


def check_learned_length(length, max_length, what="a sequence"):
    """ValueError for `what` of `length` tokens past `max_length` learned positions; a length
    of None (unknown until run time) passes."""
    if length is not None and length > max_length:
        raise ValueError(f"{what} of {length} tokens is longer than max_length {max_length}, "
                         f"the number of learned positions")


@keras.saving.register_keras_serializable(package="kerasllm")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding (reversible, for tied output projections) plus positions.

    Args:
        vocab_size: number of token ids.
        max_length: number of learned positions.
        hidden_dim: embedding width `C`.
        position: "learned", "sinusoidal" or "rotary" (nothing added here). Learned
            positions are `0..max_length-1`; the others work at any position.
        dropout: dropout on the summed embeddings.

    Call arguments:
        token_ids: `[B, T]` int ids.
        positions: `[B, T]` int positions, or None for `0..T-1` in every row.
    Returns `[B, T, C]`.

    Example:
    >>> layer = TokenAndPositionEmbedding(vocab_size=10, max_length=8, hidden_dim=4)
    >>> tuple(layer(ops.zeros((2, 3), "int32"), ops.zeros((2, 3), "int32")).shape)
    (2, 3, 4)
    """

    def __init__(self, vocab_size, max_length, hidden_dim, position="learned", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.hidden_dim = hidden_dim
        # At construction: an unknown kind would add no position information at all.
        self.position = check_position(position)
        self.dropout = dropout

    def build(self, token_ids_shape, positions_shape=None):
        init = keras.initializers.RandomNormal(stddev=0.02)
        # keras.layers.ReversibleEmbedding gives `reverse=True` for tied LM heads.
        self.token_embedding = keras.layers.ReversibleEmbedding(
            self.vocab_size, self.hidden_dim, embeddings_initializer=init,
            name="token_embedding", dtype=self.dtype_policy,
        )
        self.token_embedding.build(token_ids_shape)
        if self.position == "learned":
            self.position_embeddings = self.add_weight(
                name="position_embeddings", shape=(self.max_length, self.hidden_dim), initializer=init,
            )
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    def _check_learned_positions(self, token_ids, positions):
        """ValueError for learned positions past the table, where that is known without
        running the graph: a static sequence length (eager, or traced with a static length)
        over `max_length`, or explicit positions outside `0..max_length-1` in an eager call.

        Not checked inside a traced graph (dynamic length, or positions as graph tensors): XLA
        compiles TensorFlow's Assert to a no-op, and its gather clamps an out-of-range index
        (TensorFlow's on the GPU returns zeros), so a compiled training step could only pay
        for a check that never fires. There, callers keep within max_length (CausalLM and
        Seq2SeqLM check their generation lengths against it, and every model the inputs given to
        fit/evaluate/predict: `TransformerModel.check_inputs`).
        """
        if positions is None:
            check_learned_length(token_ids.shape[1], self.max_length)
            return
        import tensorflow as tf  # noqa: PLC0415 - the TF backend only

        if keras.utils.is_keras_tensor(positions) or not tf.executing_eagerly():
            return
        positions = np.asarray(positions)
        if positions.size:
            for bad in (positions.max(), positions.min()):
                if not 0 <= bad < self.max_length:
                    raise ValueError(f"position {bad} is outside the learned positions 0..{self.max_length - 1} "
                                     f"(max_length {self.max_length})")

    def call(self, token_ids, positions=None, training=None):
        if self.position == "learned":
            self._check_learned_positions(token_ids, positions)
        x = self.token_embedding(token_ids)
        if positions is None and self.position != "rotary":
            # Positions 0..T-1 (training without padding): a slice of the table, whose
            # gradient is a cheap pad, instead of a gather whose gradient is a scatter-add.
            length = ops.shape(token_ids)[1]
            if self.position == "learned":
                return self.dropout_layer(x + ops.cast(self.position_embeddings[:length], x.dtype)[None],
                                          training=training)
            positions = ops.arange(length, dtype="int32")[None, :]
        if self.position == "learned":
            x = x + ops.cast(ops.take(self.position_embeddings, positions, axis=0), x.dtype)
        elif self.position == "sinusoidal":
            x = x + ops.cast(sinusoidal_encoding(positions, self.hidden_dim), x.dtype)
        return self.dropout_layer(x, training=training)

    def logits(self, hidden):
        """Tied output projection `[B, T, C]` -> `[B, T, V]`."""
        return self.token_embedding(hidden, reverse=True)

    def get_config(self):
        config = super().get_config()
        config.update(vocab_size=self.vocab_size, max_length=self.max_length, hidden_dim=self.hidden_dim,
                      position=self.position, dropout=self.dropout)
        return config

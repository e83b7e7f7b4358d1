"""One transformer block for all three families.

Self-attention (causal or not, with a KV cache), optional cross-attention to an
encoder's keys/values, and a feed-forward block; pre-LN (GPT-2 and later) or post-LN
(original Transformer, BERT) residual wiring; dropout on every residual branch.
"""

from __future__ import annotations

import keras

from kerasllm.config import head_problem
from kerasllm.layers.attention import MultiHeadAttention
from kerasllm.layers.feedforward import FeedForward, check_activation


@keras.saving.register_keras_serializable(package="kerasllm")
class TransformerBlock(keras.layers.Layer):
    """A transformer block.

    Args:
        num_heads: attention heads.
        intermediate_dim: feed-forward inner width.
        dropout: residual and attention dropout.
        activation: feed-forward activation ("gelu", "relu", "swiglu").
        norm_first: pre-LN when True, post-LN when False.
        layer_norm_epsilon: LayerNormalization epsilon.
        use_bias: projection biases.
        rotary: rotary position embeddings in self-attention.
        cross_attention: add a cross-attention sub-block (encoder-decoder decoders).

    Call arguments:
        x: `[B, T, C]`.
        self_bias: additive self-attention bias `[B|1, 1, T, S]` (see `attention_bias`).
        positions: `[B, T]` positions (rotary).
        past_key, past_value, cache_update_index: the self-attention cache.
        cross_key, cross_value: encoder keys/values `[B, H, S_enc, D]` (cross-attention).
        cross_bias: additive cross-attention bias `[B, 1, 1, S_enc]`.
    Returns `(x, key, value)`, the block output and the updated self-attention cache.

    Example:
    >>> block = TransformerBlock(num_heads=2, intermediate_dim=64)
    >>> out, key, value = block(keras.random.normal((1, 4, 32)))
    >>> tuple(out.shape)
    (1, 4, 32)
    """

    def __init__(self, num_heads, intermediate_dim, dropout=0.0, activation="gelu", norm_first=True,
                 layer_norm_epsilon=1e-5, use_bias=True, rotary=False, cross_attention=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.activation = check_activation(activation)  # at construction, not when build makes the FeedForward
        self.norm_first = norm_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias
        self.rotary = rotary
        self.cross_attention = cross_attention

    def _norm(self, name, shape):
        norm = keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name=name,
                                               dtype=self.dtype_policy)
        norm.build(shape)
        return norm

    def build(self, x_shape, *args, **kwargs):
        x_shape = tuple(x_shape)  # a list when Keras restores it from a saved model's JSON
        width = x_shape[-1]
        # The configs' rule: heads that do not split the width would silently attend over a narrower one.
        problem = head_problem(width, self.num_heads, self.rotary)
        if problem:
            raise ValueError(problem)
        head_dim = width // self.num_heads
        common = dict(num_heads=self.num_heads, head_dim=head_dim, dropout=self.dropout,
                      use_bias=self.use_bias, dtype=self.dtype_policy)
        self.self_attention = MultiHeadAttention(rotary=self.rotary, name="self_attention", **common)
        self.self_attention.build(x_shape)
        self.self_attention_norm = self._norm("self_attention_norm", x_shape)
        if self.cross_attention:
            self.cross_attention_layer = MultiHeadAttention(cross_attention=True, name="cross_attention",
                                                            **common)
            self.cross_attention_layer.build(x_shape, x_shape)
            self.cross_attention_norm = self._norm("cross_attention_norm", x_shape)
        self.feedforward = FeedForward(self.intermediate_dim, self.activation, self.use_bias,
                                       name="feedforward", dtype=self.dtype_policy)
        self.feedforward.build(x_shape)
        self.feedforward_norm = self._norm("feedforward_norm", x_shape)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    def _residual(self, x, norm, sublayer, training):
        """Pre-LN: x + f(norm(x)). Post-LN: norm(x + f(x))."""
        if self.norm_first:
            return x + self.dropout_layer(sublayer(norm(x)), training=training)
        return norm(x + self.dropout_layer(sublayer(x), training=training))

    def call(self, x, self_bias=None, positions=None, past_key=None, past_value=None, cache_update_index=None,
             cross_key=None, cross_value=None, cross_bias=None, training=None):
        cache = {}

        def self_attend(h):
            out, cache["key"], cache["value"] = self.self_attention(
                h, bias=self_bias, positions=positions, past_key=past_key, past_value=past_value,
                cache_update_index=cache_update_index, training=training,
            )
            return out

        x = self._residual(x, self.self_attention_norm, self_attend, training)
        if self.cross_attention:
            x = self._residual(
                x, self.cross_attention_norm,
                lambda h: self.cross_attention_layer.cross_attend(h, cross_key, cross_value, cross_bias,
                                                                  training=training),
                training,
            )
        x = self._residual(x, self.feedforward_norm, self.feedforward, training)
        return x, cache["key"], cache["value"]

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, intermediate_dim=self.intermediate_dim, dropout=self.dropout,
            activation=self.activation, norm_first=self.norm_first, layer_norm_epsilon=self.layer_norm_epsilon,
            use_bias=self.use_bias, rotary=self.rotary, cross_attention=self.cross_attention,
        )
        return config

"""The position-wise feed-forward block: GELU/ReLU MLP, or gated SwiGLU."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kerasllm")
class FeedForward(keras.layers.Layer):
    """`C -> intermediate -> C` with GELU or ReLU, or SwiGLU (`silu(x W) * (x V)`).

    Args:
        intermediate_dim: inner width.
        activation: "gelu" (exact, erf form), "relu" or "swiglu".
        use_bias: biases on both projections.

    Example:
    >>> tuple(FeedForward(64)(keras.random.normal((2, 3, 16))).shape)
    (2, 3, 16)
    """

    def __init__(self, intermediate_dim, activation="gelu", use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.use_bias = use_bias

    def build(self, x_shape):
        gated = self.activation == "swiglu"
        self.inner_dense = keras.layers.Dense(
            self.intermediate_dim * (2 if gated else 1), use_bias=self.use_bias, name="inner",
            dtype=self.dtype_policy,
        )
        self.inner_dense.build(x_shape)
        self.output_dense = keras.layers.Dense(x_shape[-1], use_bias=self.use_bias, name="output",
                                               dtype=self.dtype_policy)
        self.output_dense.build(x_shape[:-1] + (self.intermediate_dim,))
        self.built = True

    def call(self, x):
        h = self.inner_dense(x)
        if self.activation == "swiglu":
            gate, up = ops.split(h, 2, axis=-1)
            h = ops.silu(gate) * up
        elif self.activation == "gelu":
            h = ops.gelu(h, approximate=False)
        else:
            h = ops.relu(h)
        return self.output_dense(h)

    def get_config(self):
        config = super().get_config()
        config.update(intermediate_dim=self.intermediate_dim, activation=self.activation, use_bias=self.use_bias)
        return config

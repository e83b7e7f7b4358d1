"""The position-wise feed-forward block: GELU/ReLU MLP, or gated SwiGLU."""

from __future__ import annotations

import keras
from keras import ops

from kerasllm.config import ACTIVATIONS


_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


@ops.custom_gradient
def gelu_for_training(x):
    """Exact (erf) GELU, `ops.gelu(x, approximate=False)`, with its gradient written out.

    Why by hand: differentiated as written, XLA keeps intermediates of the forward's erf and
    exp for the backward and reads them back: on the CPU, one more kernel and two more passes
    over the `[tokens, intermediate]` activations per layer, the largest tensors of the step.
    Here the backward recomputes `Phi(x) + x phi(x)` from `x` alone in one kernel, as PyTorch's
    GELU backward does. Measured with XLA's profiler on the benchmark model
    (tests/benchmarks/bench_train_causal_lm.py's shape, 4 alternated profiles each), element-wise
    kernel time per step: with TensorFlow's default threads 11.6-12.5 -> 10.8-11.5 ms (of ~32 ms
    of kernels; a prototype of this function), with one intra-op thread per part (as `kerasllm
    train` runs on 2 cores) 9.5-10.1 -> 9.2-10.1 ms; a third session, in a drifting slow phase,
    showed it only against the unchanged dots (element-wise / dot time 0.56-0.59 -> 0.54-0.56).
    A small gain (~1-3% of kernel time); the losses equal. The backward's `1 - erf(-z)` (not `1 + erf(z)`)
    keeps XLA from sharing one erf kernel between the passes (part_gradients 160 -> 152 kernels).
    """
    y = ops.gelu(x, approximate=False)

    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        cdf = 0.5 * (1.0 - ops.erf(x * -_SQRT_HALF))
        pdf = ops.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return upstream * (cdf + x * pdf)

    return y, grad


def check_activation(activation):
    """`activation` if FeedForward knows it, else ValueError naming the ones it does."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of "
                         f"{', '.join(repr(name) for name in ACTIVATIONS)}")
    return activation


def _optimization_barrier(x):
    """`x`, through XLA's optimization barrier (a plain identity outside XLA): XLA may not fold
    the ops on either side into each other. TensorFlow exposes it only in its tf2xla module."""
    from tensorflow.compiler.tf2xla.python import xla  # noqa: PLC0415 - the TF backend only

    return xla.optimization_barrier(x)[0]


def _cpu_only() -> bool:
    """No GPU or TPU in this process: where narrowing_projection was measured (cuBLAS and TPUs
    were not, and would only pay its transpose)."""
    import tensorflow as tf  # noqa: PLC0415 - the TF backend only

    return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


@ops.custom_gradient
def narrowing_projection(x, kernel):
    """`x @ kernel` for a kernel `[in, out]` with `in > out` (the feed-forward block's output),
    whose kernel gradient is computed as `(dy^T x)^T`: a `[out, in]` product, then a transpose.

    Why: differentiated as written, the kernel gradient is `x^T dy`, an XLA dot whose output is
    `[in, out]`; XLA's CPU dot (Eigen) runs it at about half the rate of the same product laid out
    `[out, in]`. Measured with XLA's profiler on the benchmark model (tests/benchmarks/
    bench_train_causal_lm.py's shape, one part of the split step: 384 tokens, `[384, 512]^T
    [384, 128]`, one thread, AMD EPYC): 910-935 us per layer at ~54 GFLOP/s, against ~520 us for
    the feed-forward's input kernel gradient, `[384, 128]^T [384, 512]` (~95 GFLOP/s); with this
    function ~545 us, plus a ~60 us copy that lays the gradient back out `[in, out]`. The barrier
    keeps XLA from folding `(dy^T x)^T` back into `x^T dy` (without it, the same slow dot). Whole
    `kerasllm train causal-lm` runs at that shape (300 steps, cold XLA cache, 6 alternated pairs,
    2-core AMD EPYC): steady tokens/s 22,845 -> 24,955 (medians, higher in 5/6), wall 18.1 -> 16.6
    s, the validation loss the same to four digits (after 2000 iterations still 1.823).
    """
    y = ops.matmul(x, kernel)

    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        dx = ops.matmul(upstream, ops.transpose(kernel))
        rows_in = ops.reshape(x, (-1, ops.shape(kernel)[0]))
        rows_out = ops.reshape(upstream, (-1, ops.shape(kernel)[1]))
        kernel_t = _optimization_barrier(ops.matmul(ops.transpose(rows_out), rows_in))
        return dx, ops.transpose(kernel_t)

    return y, grad


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
        self.activation = check_activation(activation)
        self.use_bias = use_bias

    def build(self, x_shape):
        x_shape = tuple(x_shape)  # a list when Keras restores it from a saved model's JSON
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

    def call(self, x, training=None):
        h = self.inner_dense(x)
        if self.activation == "swiglu":
            gate, up = ops.split(h, 2, axis=-1)
            h = ops.silu(gate) * up
        elif self.activation == "gelu":
            # Inference keeps the plain op: its graph is what ONNX export and ONNX Runtime's
            # GELU fusion expect.
            h = gelu_for_training(h) if training else ops.gelu(h, approximate=False)
        else:  # "relu" (__init__ admits no other)
            h = ops.relu(h)
        if not training or self.output_dense.quantization_mode is not None or not _cpu_only():
            return self.output_dense(h)
        # Training on the CPU: the same product with a faster kernel gradient (narrowing_projection).
        y = narrowing_projection(h, ops.cast(self.output_dense.kernel, h.dtype))
        return y + ops.cast(self.output_dense.bias, y.dtype) if self.use_bias else y

    def get_config(self):
        config = super().get_config()
        config.update(intermediate_dim=self.intermediate_dim, activation=self.activation, use_bias=self.use_bias)
        return config

"""Multi-head attention with a KV cache that both XLA and ONNX can express.

Why not keras-hub's `CachedMultiHeadAttention`: it updates its cache with
`ops.slice_update`, which TensorFlow lowers to `XlaDynamicUpdateSlice`, an op tf2onnx
cannot convert. This layer supports two cache formulations over the same weights:

* growing cache (ONNX export, ORT GenAI layout): `past_key`/`past_value` of shape
  `[B, H, P, D]` come in, `present = concat(past, new)` of shape `[B, H, P + T, D]`
  goes out. One graph serves the prompt step (P = 0) and every decode step.
* fixed buffer (Keras generation under XLA): `past_key`/`past_value` are
  `[B, H, S_max, D]` buffers updated in place at `cache_update_index`, so the
  while-loop keeps static shapes.

Shapes: `B` batch, `T` new tokens, `P` past tokens, `S` attended tokens,
`H` heads, `D` head size, `C` model width.
"""

from __future__ import annotations

import keras
from keras import ops

# A large negative number for masked logits. Attention logits are always in float32
# (see `attend`), so this never overflows under mixed precision.
MASK_VALUE = -1e9


def attention_bias(query_length, key_length, attention_mask=None, causal=True, query_start=None):
    """Additive attention bias of shape `[B or 1, 1, T, S]` in float32.

    Args:
        query_length: `T`, the number of new (query) tokens.
        key_length: `S`, the number of attended (key) tokens.
        attention_mask: optional `[B, S]` with 1 for tokens to attend to, 0 for padding.
        causal: whether query `i` only sees keys at absolute positions `<= query_start + i`.
        query_start: absolute position of the first query; defaults to `S - T`
            (the growing-cache case, where the queries are the last `T` keys).
    """
    allowed = None
    if causal:
        if query_start is None:
            query_start = key_length - query_length
        query_pos = ops.arange(query_length, dtype="int32")[:, None] + ops.cast(query_start, "int32")
        key_pos = ops.arange(key_length, dtype="int32")[None, :]
        allowed = ops.expand_dims(ops.expand_dims(key_pos <= query_pos, 0), 0)  # [1, 1, T, S]
    if attention_mask is not None:
        keep = ops.cast(attention_mask, "bool")[:, None, None, :]  # [B, 1, 1, S]
        allowed = keep if allowed is None else ops.logical_and(allowed, keep)
    if allowed is None:
        return None
    return ops.where(allowed, 0.0, MASK_VALUE)


@keras.saving.register_keras_serializable(package="kerasllm")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention, self or cross, with an export-friendly KV cache.

    Queries, keys and values come from one fused projection for self-attention (one
    matmul instead of three); cross-attention projects queries from `x` and
    keys/values from the encoder output once per input (`project_key_value`).

    Args:
        num_heads: number of heads `H`.
        head_dim: size of each head `D`.
        dropout: dropout on the attention probabilities.
        use_bias: biases on the projections.
        rotary: apply rotary position embeddings (RoPE) to queries and keys.
        cross_attention: keys and values come from a separate `context` sequence.

    Call arguments (self-attention):
        x: `[B, T, C]`.
        bias: additive float32 bias `[B or 1, 1, T, S]` from `attention_bias`, or None.
        positions: `[B, T]` int positions, used by rotary embeddings.
        past_key, past_value: the cache (see the module docstring), or None.
        cache_update_index: None for the growing cache, else the buffer index.
    Returns `(output [B, T, C], key, value)` where key/value are the updated cache.

    Call arguments (cross-attention): `x`, `context` `[B, S, C_context]` (required; its
    width sizes the key/value projection when the first call builds the layer), `bias`.
    Returns `(output [B, T, C], key, value)`, key/value projected from `context`; decoders
    project once (`project_key_value`) and attend per step (`cross_attend`) instead.

    Example:
    >>> layer = MultiHeadAttention(num_heads=2, head_dim=16)
    >>> x = keras.random.normal((1, 5, 32))
    >>> out, key, value = layer(x, bias=attention_bias(5, 5))
    >>> tuple(key.shape)
    (1, 2, 5, 16)
    """

    def __init__(self, num_heads, head_dim, dropout=0.0, use_bias=True, rotary=False,
                 cross_attention=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.use_bias = use_bias
        self.rotary = rotary
        self.cross_attention = cross_attention

    def build(self, x_shape, context_shape=None):
        # Keras builds a layer on its first call from the shapes of call's tensor arguments,
        # passing each to the build parameter named after it plus `_shape`: `context_shape` is
        # `call`'s `context` (a build parameter without a call argument of that name fails).
        # Shapes may be lists (Keras restores them from JSON when loading a saved model).
        x_shape = tuple(x_shape)
        context_shape = None if context_shape is None else tuple(context_shape)
        width = x_shape[-1]
        inner = self.num_heads * self.head_dim
        dense = dict(use_bias=self.use_bias, dtype=self.dtype_policy)
        if self.cross_attention:
            self.query_dense = keras.layers.Dense(inner, name="query", **dense)
            self.query_dense.build(x_shape)
            self.key_value_dense = keras.layers.Dense(2 * inner, name="key_value", **dense)
            self.key_value_dense.build(context_shape or x_shape)
        else:
            self.qkv_dense = keras.layers.Dense(3 * inner, name="qkv", **dense)
            self.qkv_dense.build(x_shape)
        self.output_dense = keras.layers.Dense(width, name="output", **dense)
        self.output_dense.build(x_shape[:-1] + (inner,))
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        if self.rotary:
            import keras_hub  # noqa: PLC0415 - heavy import only when rotary is used

            self.rotary_embedding = keras_hub.layers.RotaryEmbedding(dtype=self.dtype_policy)
        self.built = True

    # -- pieces ----------------------------------------------------------------------------
    def _heads(self, x, count):
        """`[B, T, count * H * D]` -> `count` tensors of `[B, T, H, D]`."""
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        x = ops.reshape(x, (batch, length, count, self.num_heads, self.head_dim))
        return [x[:, :, i] for i in range(count)]

    def _rope(self, x, positions):
        if not self.rotary:
            return x
        return self.rotary_embedding(x, positions=positions)

    def attend(self, query, key, value, bias, training=None):
        """Scaled dot-product attention: query `[B,H,T,D]`, key/value `[B,H,S,D]` -> `[B,T,C]`."""
        scale = 1.0 / (self.head_dim ** 0.5)
        scores = ops.matmul(query, ops.transpose(key, (0, 1, 3, 2)))
        # Softmax in float32 keeps mixed precision and fp16 exports free of overflow.
        scores = ops.cast(scores, "float32") * scale
        if bias is not None:
            # Keras casts float call arguments to the compute dtype, so under mixed precision
            # the bias arrives in float16 (where MASK_VALUE is -inf) or bfloat16: back to
            # float32, with -inf clamped to MASK_VALUE so a fully masked row stays finite.
            bias = ops.maximum(ops.cast(bias, "float32"), MASK_VALUE)
            # Broadcast explicitly: without XLA, TensorFlow's oneDNN graph rewrite fuses this
            # BatchMatMul + Add into _MklFusedBatchMatMulV2, whose kernel is ~45x slower with a
            # broadcast [B or 1, 1, T, S] addend (50 ms vs 1.1 ms at [12, 4, 64, 64] on CPU).
            # XLA fuses the broadcast away, and the ONNX export drops it (convert.py).
            scores = scores + ops.broadcast_to(bias, ops.shape(scores))
        probs = ops.softmax(scores, axis=-1)
        probs = self.dropout_layer(ops.cast(probs, self.compute_dtype), training=training)
        context = ops.matmul(probs, value)  # [B, H, T, D]
        context = ops.transpose(context, (0, 2, 1, 3))
        batch, length = ops.shape(context)[0], ops.shape(context)[1]
        context = ops.reshape(context, (batch, length, self.num_heads * self.head_dim))
        return self.output_dense(context)

    def project_key_value(self, context):
        """Cross-attention keys and values `[B, H, S, D]`, computed once per input."""
        key, value = self._heads(self.key_value_dense(context), 2)
        return ops.transpose(key, (0, 2, 1, 3)), ops.transpose(value, (0, 2, 1, 3))

    # -- call ------------------------------------------------------------------------------
    def call(self, x, bias=None, positions=None, past_key=None, past_value=None,
             cache_update_index=None, training=None, context=None):
        if self.cross_attention:
            if context is None:
                raise ValueError("a cross-attention layer is called with `context` (the sequence it attends "
                                 "to), or through `cross_attend` with keys/values from `project_key_value`")
            key, value = self.project_key_value(context)
            return self.cross_attend(x, key, value, bias, training=training), key, value
        if context is not None:
            raise ValueError("`context` is for cross-attention layers (`cross_attention=True`); "
                             "this one is self-attention")
        query, key, value = self._heads(self.qkv_dense(x), 3)
        query = ops.transpose(self._rope(query, positions), (0, 2, 1, 3))
        key = ops.transpose(self._rope(key, positions), (0, 2, 1, 3))
        value = ops.transpose(value, (0, 2, 1, 3))
        if past_key is not None:
            if cache_update_index is None:
                key = ops.concatenate([ops.cast(past_key, key.dtype), key], axis=2)
                value = ops.concatenate([ops.cast(past_value, value.dtype), value], axis=2)
            else:
                start = [0, 0, cache_update_index, 0]
                key = ops.slice_update(past_key, start, ops.cast(key, past_key.dtype))
                value = ops.slice_update(past_value, start, ops.cast(value, past_value.dtype))
        output = self.attend(query, key, value, bias, training=training)
        return output, key, value

    def cross_attend(self, x, key, value, bias=None, training=None):
        """Attend from `x` `[B, T, C]` to precomputed encoder keys/values `[B, H, S, D]`."""
        query = ops.transpose(self._heads(self.query_dense(x), 1)[0], (0, 2, 1, 3))
        return self.attend(query, key, value, bias, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            dropout=self.dropout,
            use_bias=self.use_bias,
            rotary=self.rotary,
            cross_attention=self.cross_attention,
        )
        return config

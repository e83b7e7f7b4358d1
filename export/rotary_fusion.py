"""Recognize keras-hub's rotary position embedding (RoPE) in tf2onnx graphs, for the attention fusions.

Written by hand for the same reason as attention_fusion.py: ONNX Runtime's transformer
optimizer fuses rotary embeddings only in the PyTorch/Hugging Face subgraphs of its own model
types (LLaMA, Phi), none of which tf2onnx produces. `kerasllm.layers.MultiHeadAttention`
applies `keras_hub.layers.RotaryEmbedding` to the queries and keys of each head (`[B, T, H, D]`,
before they are cached), which tf2onnx traces as

    out   = Add(Mul(x, Cos(angle)), Mul(half, Sin(angle)))
    half  = Reshape(Concat(Unsqueeze(Neg(x2)), Unsqueeze(x1)))      x1, x2 = Split(x) (last axis, halves)
    angle = Unsqueeze(Reshape(Concat(Unsqueeze(f), Unsqueeze(f))))  (f twice: [.., D/2] -> [.., D])
    f     = Mul(Unsqueeze(Cast(positions)), inverse_frequencies)     (a constant, [.., D/2])

i.e. "rotate half" RoPE (GPT-NeoX's layout, ONNX Runtime's `interleaved=0`) with the angle of
pair i at position p equal to `p * inverse_frequencies[i]`. The fusions replace it by ONNX
Runtime's kernels, which read `cos`/`sin` from tables indexed by position (`rotary_tables`):
`com.microsoft.RotaryEmbedding` before a MultiHeadAttention, or GroupQueryAttention's own
`do_rotary`. The inverse frequencies are read from the graph, so any `max_wavelength` works;
anything else in the subgraph (a scaling factor, partial rotation) leaves the layer unfused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kerasllm.export.convert import _constant_value, typed_producer


@dataclass(frozen=True)
class Rotary:
    """One matched rotary embedding: `source` rotated by the angles of `positions`."""

    source: str  # the tensor rotated, [B, T, H, D]
    positions: str  # the integer positions [B, T] the angles are computed from
    inverse_frequencies: tuple[float, ...]  # D/2 values

    @property
    def angles(self) -> tuple:
        """What the rotation angles depend on: equal for the queries and keys of a layer."""
        return self.positions, self.inverse_frequencies


def match_rotary(model: onnx.ModelProto, producers: dict, name: str) -> Rotary | None:
    """The rotary embedding producing tensor `name`, or None if it is produced another way."""
    producer = functools.partial(typed_producer, producers)
    add = producer(name, "Add")
    muls = [producer(i, "Mul") for i in add.input] if add else []
    if len(muls) != 2 or not all(muls):
        return None
    for plain, rotated in (muls, muls[::-1]):
        cos = _operand(producers, plain, "Cos")
        sin = _operand(producers, rotated, "Sin")
        if not cos or not sin or cos[0].input[0] != sin[0].input[0]:
            continue
        source, half = cos[1], sin[1]
        if not _rotates_half(model, producers, half, source):
            continue
        angles = _angles(model, producers, cos[0].input[0])
        if angles is None:
            return None
        positions, inverse = angles
        return Rotary(source, positions, tuple(float(v) for v in inverse))
    return None


def rotary_tables(inverse_frequencies, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """`cos` and `sin` tables `[rows, D/2]` (float32) for positions `0..rows-1`, computed as the
    Keras layer computes the angles (float32 position x float32 inverse frequency)."""
    angles = np.arange(rows, dtype=np.float32)[:, None] * np.asarray(inverse_frequencies, np.float32)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class RotaryTables:
    """The cos/sin tables (initializers of `model`, `rows` positions) a fusion's rotations read:
    one pair per set of inverse frequencies, shared by every layer that uses it."""

    def __init__(self, model: onnx.ModelProto, rows: int, prefix: str):
        self.model, self.rows, self.prefix = model, rows, prefix
        self.made: dict[tuple[float, ...], tuple[str, str]] = {}

    def __call__(self, rotary: Rotary) -> tuple[str, str]:
        """`(cos name, sin name)` for `rotary`'s frequencies."""
        if rotary.inverse_frequencies not in self.made:
            name = f"{self.prefix}_{len(self.made)}"
            cos, sin = rotary_tables(rotary.inverse_frequencies, self.rows)
            self.model.graph.initializer.extend([numpy_helper.from_array(cos, f"{name}/cos_cache"),
                                                 numpy_helper.from_array(sin, f"{name}/sin_cache")])
            self.made[rotary.inverse_frequencies] = (f"{name}/cos_cache", f"{name}/sin_cache")
        return self.made[rotary.inverse_frequencies]


def rotary_embedding(x: str, position_ids: str, tables: tuple[str, str], num_heads: int,
                     name: str) -> onnx.NodeProto:
    """`com.microsoft.RotaryEmbedding` of `x` (`[B, T, N*D]`) into `{x}/rotary`: rotate-half, as matched."""
    return helper.make_node("RotaryEmbedding", [x, position_ids, *tables], [f"{x}/rotary"], name=name,
                            domain="com.microsoft", interleaved=0, num_heads=num_heads)


def _operand(producers: dict, mul, op_type: str):
    """`(the op_type node, the other operand)` of a two-input Mul, or None."""
    for i in (0, 1):
        node = typed_producer(producers, mul.input[i], op_type)
        if node is not None:
            return node, mul.input[1 - i]
    return None


def _ints(node, name: str):
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _int(node, name: str):
    return next((a.i for a in node.attribute if a.name == name), None)


def _unsqueezed(model, producers, name: str):
    """`(input, axes)` of the Unsqueeze producing `name` (axes as an input or an attribute)."""
    node = typed_producer(producers, name, "Unsqueeze")
    if node is None:
        return None, None
    axes = _ints(node, "axes")
    if axes is None and len(node.input) > 1:
        value = _constant_value(model, node.input[1], producers)
        axes = None if value is None else value.ravel().tolist()
    return node.input[0], axes


def _rotates_half(model, producers, half: str, source: str) -> bool:
    """Whether `half` is `concat(-x2, x1)` of `source`'s two halves (stacked, then reshaped back)."""
    reshape = typed_producer(producers, half, "Reshape")
    concat = reshape and typed_producer(producers, reshape.input[0], "Concat")
    if not concat or len(concat.input) != 2:
        return False
    (first, axes_a), (second, axes_b) = (_unsqueezed(model, producers, n) for n in concat.input)
    neg = first and typed_producer(producers, first, "Neg")
    split = neg and typed_producer(producers, neg.input[0], "Split")
    if (not split or split.input[0] != source or len(split.output) != 2 or neg.input[0] != split.output[1]
            or second != split.output[0]):
        return False
    # Two equal halves along the last axis of [B, T, H, D], stacked on a new axis just before it.
    sizes = _ints(split, "split")
    if sizes is None and len(split.input) > 1 and split.input[1]:
        value = _constant_value(model, split.input[1], producers)
        sizes = None if value is None else value.ravel().tolist()
    axis, stack_axis = _int(split, "axis"), _int(concat, "axis")
    if (sizes is not None and len(set(sizes)) != 1) or axis is None or axis % 4 != 3 or stack_axis is None:
        return False
    return axes_a is not None and axes_a == axes_b and len(axes_a) == 1 and axes_a[0] % 5 == stack_axis % 5 == 3


def _angles(model, producers, angle: str):
    """`(positions, inverse frequencies)` of an angle tensor `[B, T, 1, D]`, or None."""
    expand, _ = _unsqueezed(model, producers, angle)
    reshape = expand and typed_producer(producers, expand, "Reshape")
    concat = reshape and typed_producer(producers, reshape.input[0], "Concat")
    if not concat or len(concat.input) != 2:
        return None
    (first, axes_a), (second, axes_b) = (_unsqueezed(model, producers, n) for n in concat.input)
    if not first or first != second or axes_a != axes_b or axes_a is None or _int(concat, "axis") != axes_a[0]:
        return None
    mul = typed_producer(producers, first, "Mul")
    if not mul:
        return None
    for i in (0, 1):
        inverse = _constant_value(model, mul.input[1 - i], producers)
        positions, _ = _unsqueezed(model, producers, mul.input[i])
        cast = positions and typed_producer(producers, positions, "Cast")
        if inverse is not None and cast is not None and inverse.ndim >= 1 and inverse.size == inverse.shape[-1] \
                and _int(cast, "to") == onnx.TensorProto.FLOAT:
            return cast.input[0], inverse.ravel()
    return None

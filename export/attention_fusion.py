"""Fuse the encoder's self-attention into one `com.microsoft.Attention` node per layer.

Written by hand because ONNX Runtime's own attention fusions (the transformer optimizer's
"bert" model type) look for PyTorch/Hugging Face subgraphs and match none of tf2onnx's.
The subgraph of `kerasllm.layers.MultiHeadAttention` without a cache is fixed:

    qkv = x @ W + b [B,T,3C] -> Reshape [B,T,3,N,D] -> Slice/Squeeze/Transpose
        -> q [B,N,T,D], k^T [B,N,D,T], v [B,N,T,D]
    softmax(q @ k^T * scale + bias) @ v -> Transpose -> Reshape [B,T,C]

with `bias = where(attention_mask, 0, MASK_VALUE)` of shape [B,1,1,S]. It becomes

    Attention(x, W, b, mask_index = int32(bool(attention_mask)))

with the same scale and `mask_filter_value = MASK_VALUE`, so padded keys get the same
additive bias as in Keras. One kernel replaces ~17 nodes per layer: it computes the q/k/v
projection with prepacked weights straight into the per-head layout (no Slice/Transpose
copies) and the scores, softmax and context per head, while they are in cache.

Why `Attention` and not `MultiHeadAttention` (measured on the 'small' preset, batch 64 x 128,
2-core CPU, interleaved runs): Attention 758 seq/s, MultiHeadAttention after three
projections 720, MultiHeadAttention after a Split of qkv 718, unfused 676. (ORT's
flash-attention path for MultiHeadAttention needs a graph without any mask.)

Rotary layers (queries and keys rotated between the projection and the scores) fuse into
MultiHeadAttention after RotaryEmbedding nodes instead (`rotary_rows`). A layer whose
subgraph differs in any other way (another scale, no projection bias, an attention bias that
depends on more than the mask) is left as it is; the export's validation then compares the
fused graph with Keras.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kerasllm.export.convert import _constant_value, graph_index, graph_inputs_read, replace_nodes, typed_producer
from kerasllm.export.rotary_fusion import RotaryTables, match_rotary, rotary_embedding

# kerasllm.layers.attention.MASK_VALUE (not imported: that module imports Keras).
MASK_VALUE = -1e9


def fuse_encoder_attention(model: onnx.ModelProto, num_heads: int, head_dim: int,
                           mask_input: str = "attention_mask", rotary_rows: int = 0) -> int:
    """Fuse every matching self-attention block of `model` in place; returns the number fused.

    Args:
        model: an fp32 encoder graph as traced by `convert.trace_to_onnx`.
        num_heads, head_dim: the attention shape (`N`, `D`).
        mask_input: the graph input holding the `[B, S]` padding mask (1 = real token).
        rotary_rows: > 0 to fuse layers with rotary positions too (their longest sequence):
            ORT's CPU `Attention` kernel refuses `do_rotary`, so such a layer becomes what ORT
            asks for instead, `Split(qkv) -> RotaryEmbedding(q), RotaryEmbedding(k) ->
            MultiHeadAttention(key_padding_mask)`, the rotation read from cos/sin tables built
            from the graph's own frequencies (rotary_fusion.py) at positions `0..S-1`.
    """
    graph = model.graph
    producers, consumers = graph_index(graph)
    width = num_heads * head_dim
    tables = RotaryTables(model, rotary_rows, "kerasllm_encoder_rotary")

    producer = functools.partial(typed_producer, producers)

    def only_consumer(name, op_type):
        nodes = consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None

    def constant(name):
        return _constant_value(model, name, producers)

    def perm(node):
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)

    def head_source(name, expected_perm):
        """`Transpose(Squeeze(Slice(Reshape(qkv))))`, a rotary embedding maybe between the Transpose
        and the Squeeze -> (qkv, index along the `3` axis, Rotary or None) or (None, None, None)."""
        transpose = producer(name, "Transpose")
        rotary = transpose and match_rotary(model, producers, transpose.input[0])
        squeeze = (transpose and perm(transpose) == expected_perm
                   and producer(rotary.source if rotary else transpose.input[0], "Squeeze"))
        slice_ = squeeze and producer(squeeze.input[0], "Slice")
        reshape = slice_ and producer(slice_.input[0], "Reshape")
        steps = len(slice_.input) > 4 and slice_.input[4] if slice_ else None
        if not reshape or len(squeeze.input) < 2 or len(slice_.input) < 4 or steps:
            return None, None, None
        shape, squeezed = constant(reshape.input[1]), constant(squeeze.input[1])
        starts, ends, axes = (constant(n) for n in slice_.input[1:4])
        if (shape is None or shape.ravel().tolist()[-3:] != [3, num_heads, head_dim] or squeezed is None
                or [int(a) % 5 for a in squeezed.ravel()] != [2] or starts is None or ends is None or axes is None):
            return None, None, None
        begin = dict(zip((int(a) % 5 for a in axes.ravel()), starts.ravel().tolist()))
        stop = dict(zip((int(a) % 5 for a in axes.ravel()), ends.ravel().tolist()))
        if 2 not in begin or stop[2] != begin[2] + 1 or any(v != 0 for a, v in begin.items() if a != 2):
            return None, None, None
        return reshape.input[0], int(begin[2]), rotary or None

    graph_inputs_under = functools.partial(graph_inputs_read, graph, producers)

    def projection(qkv):
        """`Add(MatMul(x, W), b)` with constant `W [C, 3C]`, `b [3C]` -> (x, W name, b name) or None."""
        add = producer(qkv, "Add")
        matmul = add and (producer(add.input[0], "MatMul") or producer(add.input[1], "MatMul"))
        if not matmul:
            return None
        bias = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
        weight, bias_value = constant(matmul.input[1]), constant(bias)
        if (weight is None or weight.ndim != 2 or weight.shape[1] != 3 * width or bias_value is None
                or bias_value.shape != (3 * width,)):
            return None
        return matmul.input[0], matmul.input[1], bias

    mask_index = "kerasllm_encoder_attention/mask_index"
    replacements = {}  # id(node) -> [nodes in its place]
    fused = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        add = producer(softmax.input[0], "Add")
        mul = add and (producer(add.input[0], "Mul") or producer(add.input[1], "Mul"))
        scores = mul and (producer(mul.input[0], "MatMul") or producer(mul.input[1], "MatMul"))
        context = only_consumer(softmax.output[0], "MatMul")
        out_t = context and only_consumer(context.output[0], "Transpose")
        out_r = out_t and perm(out_t) == [0, 2, 1, 3] and only_consumer(out_t.output[0], "Reshape")
        if not scores or not out_r:
            continue
        bias = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
        scale = constant(mul.input[1] if mul.input[0] == scores.output[0] else mul.input[0])
        x_q, index_q, rotary_q = head_source(scores.input[0], [0, 2, 1, 3])
        x_k, index_k, rotary_k = head_source(scores.input[1], [0, 2, 3, 1])
        x_v, index_v, rotary_v = head_source(context.input[1], [0, 2, 1, 3])
        if (scale is None or scale.size != 1 or not x_q or x_q != x_k or x_q != x_v
                or (index_q, index_k, index_v) != (0, 1, 2) or graph_inputs_under(bias) != {mask_input}):
            continue
        # Rotated queries and keys alike, at positions computed from shapes alone (0..S-1; the
        # validation checks the result); values never.
        if rotary_v or bool(rotary_q) != bool(rotary_k) or (rotary_q and (
                not rotary_rows or rotary_q.angles != rotary_k.angles or graph_inputs_under(rotary_q.positions)
                or 2 * len(rotary_q.inverse_frequencies) != head_dim)):
            continue
        source = projection(x_q)
        if not source:
            continue
        nodes = []
        if not fused:  # the mask as Attention reads it, shared by every layer; nonzero = real (as in Keras)
            nodes += [helper.make_node("Cast", [mask_input], [f"{mask_index}/bool"], name=f"{mask_index}/Cast_bool",
                                       to=onnx.TensorProto.BOOL),
                      helper.make_node("Cast", [f"{mask_index}/bool"], [mask_index], name=f"{mask_index}/Cast",
                                       to=onnx.TensorProto.INT32)]
        name = f"kerasllm_encoder_attention_{fused}"
        if rotary_q:
            nodes += _rotated_attention(model, name, x_q, mask_index, out_r.output[0], rotary_q, tables,
                                        num_heads, width, float(scale.ravel()[0]))
        else:
            nodes.append(helper.make_node(
                "Attention", [*source, mask_index], [out_r.output[0]], name=name, domain="com.microsoft",
                num_heads=num_heads, scale=float(scale.ravel()[0]), mask_filter_value=MASK_VALUE,
            ))
        replacements[id(out_r)] = nodes
        fused += 1
    if fused:
        replace_nodes(model, replacements)
    return fused


def fused_attention_ops(model: onnx.ModelProto) -> dict[str, int]:
    """What `fuse_encoder_attention` made in `model`: Attention, or MultiHeadAttention and
    RotaryEmbedding for rotary layers (op -> count, the ops present only)."""
    counts = Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")
    return {op: counts[op] for op in ("Attention", "MultiHeadAttention", "RotaryEmbedding") if counts[op]}


def _rotated_attention(model: onnx.ModelProto, name: str, qkv: str, mask_index: str, output: str, rotary,
                       tables: RotaryTables, num_heads: int, width: int, scale: float) -> list:
    """The nodes of one rotary layer (see `fuse_encoder_attention`); the tables, the start position
    and the split sizes are initializers shared by every layer."""
    start, split = "kerasllm_encoder_rotary/start", "kerasllm_encoder_rotary/split"
    if not tables.made:  # the first rotary layer
        model.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), start),  # rows from 0
                                        numpy_helper.from_array(np.array([width] * 3, np.int64), split)])
    q, k, v = (f"{name}/{part}" for part in ("query", "key", "value"))
    cos_sin = tables(rotary)
    return [
        helper.make_node("Split", [qkv, split], [q, k, v], name=f"{name}/Split", axis=-1),
        *(rotary_embedding(x, start, cos_sin, num_heads, f"{name}/RotaryEmbedding_{part}")
          for x, part in ((q, "query"), (k, "key"))),
        helper.make_node("MultiHeadAttention", [f"{q}/rotary", f"{k}/rotary", v, "", mask_index], [output],
                         name=f"{name}/MultiHeadAttention", domain="com.microsoft", num_heads=num_heads, scale=scale,
                         mask_filter_value=MASK_VALUE),
    ]

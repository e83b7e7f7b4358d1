"""Graph optimization: ONNX Runtime's transformer fusions and fp16 conversion.

Two layers of optimization, both ONNX Runtime's own:
* offline, here: `onnxruntime.transformers.optimizer` fuses LayerNormalization,
  SkipLayerNormalization, (Bias)Gelu and, where its patterns match, attention. The
  saved graph stays portable (no provider-specific kernels); the fusions that happened
  are counted and recorded in the bundle's manifest.
* at load time: every session runs ONNX Runtime's graph optimizations at
  `ORT_ENABLE_ALL` (constant folding, e.g. of the tied embedding's transpose, and
  provider-specific fusions; see runtime.py).

fp16 uses `onnxruntime.transformers.float16`: a decomposed softmax or normalization (Softmax,
ReduceMean, Pow, Sqrt) stays in float32 (`op_block_list`); a fused LayerNormalization takes fp16
and computes its statistics in float32 by definition (ONNX's `stash_type`), as the fused
attention kernels keep their softmax in float32. Integer inputs and the logits keep their types
(`keep_io_types`); the KV cache is fp16. The converter can give two Cast nodes the same name on
tf2onnx graphs, which ONNX Runtime refuses; names are made unique after.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kerasllm.export.attention_fusion import MASK_VALUE
from kerasllm.export.convert import (IR_VERSION, _constant_value, graph_index, graph_inputs_read, replace_nodes,
                                     save_onnx, typed_producer)
from kerasllm.export.rotary_fusion import RotaryTables, match_rotary, rotary_embedding
from kerasllm.export.runtime import (CROSS_ROWS_METADATA, CROSS_ROWS_PER_INPUT, KV_CACHE_METADATA, NEXT_TOKEN,
                                     SHARED_BUFFER, SUPPRESSED_METADATA)

# Ops kept in float32 in fp16 graphs: decomposed normalization statistics and softmax overflow
# in fp16. Not LayerNormalization: it computes in float32 whatever its input type (`stash_type`
# 1), and blocking it left the converter giving it mixed fp16/fp32 inputs, which ORT refuses.
FP16_BLOCKED_OPS = ["Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "CumSum"]
# Fused ops worth reporting.
FUSED_OPS = ("LayerNormalization", "SkipLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "Attention",
             "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding", "EmbedLayerNormalization")


def _op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def dedupe_node_names(model: onnx.ModelProto) -> int:
    """Give every node a unique name (float16 conversion can repeat Cast names). Returns renames."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = node.name or node.op_type
            name = f"{base}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            renamed += 1
        seen.add(node.name)
    return renamed


def fuse_cached_attention(model: onnx.ModelProto, num_heads: int, head_dim: int, rotary_rows: int = 0) -> int:
    """Fuse each layer's cached self-attention into one `com.microsoft.MultiHeadAttention` node.

    ONNX Runtime's own attention fusions look for PyTorch/Hugging Face GPT-2 and BERT
    subgraphs and match none of tf2onnx's (nor did they on keras-hub graphs). The subgraph
    of `kerasllm.layers.MultiHeadAttention` with a growing cache is fixed, so it is matched
    here, anchored on the `Concat` that produces `present.{i}.key`:

        qkv [B,T,3C] -> Reshape [B,T,3,N,D] -> Slice/Squeeze/Transpose -> q, k, v [B,N,T,D]
        present.key = Concat(past.key, k); present.value = Concat(past.value, v)
        softmax(q @ present.key^T * scale + bias) @ present.value -> Transpose -> Reshape [B,T,C]

    becomes `Split(qkv) -> MultiHeadAttention(q, k, v, attention_bias=bias, past_key,
    past_value) -> (out, present.key, present.value)`: one kernel instead of ~22 nodes per
    layer, with the same math (validation checks it). Cache names follow the graph's
    outputs: `present.{i}.key` (decoder-only) or `present.{i}.decoder.key` (seq2seq).
    A seq2seq decoder's cross-attention to precomputed `past_key_values.{i}.encoder.*`
    becomes one MultiHeadAttention node too. With `rotary_rows` > 0, self-attention whose
    queries and keys are rotated by keras-hub's RotaryEmbedding (rotary_fusion.py) fuses too:
    `com.microsoft.RotaryEmbedding` on q and k after the Split, reading `cos`/`sin` tables of
    `rotary_rows` positions. A layer whose subgraph differs in any other way (another scale,
    a rotation of another form) is left as it is. Returns the number fused.
    """

    graph = model.graph
    producers, consumers = graph_index(graph)

    producer = functools.partial(typed_producer, producers)

    def head_source(name):
        """`Transpose(Squeeze(Slice(Reshape(x))))`, a rotary embedding (rotary_fusion.py) maybe
        between the Transpose and the Squeeze -> (x, slice index along the `3` axis, Rotary or None)."""
        transpose = producer(name, "Transpose")
        rotary = transpose and match_rotary(model, producers, transpose.input[0])
        squeeze = transpose and producer(rotary.source if rotary else transpose.input[0], "Squeeze")
        slice_ = squeeze and producer(squeeze.input[0], "Slice")
        reshape = slice_ and producer(slice_.input[0], "Reshape")
        if not reshape:
            return None, None, None
        starts, ends = (_constant_value(model, name, producers) for name in slice_.input[1:3])
        axes = _constant_value(model, slice_.input[3], producers) if len(slice_.input) > 3 else None
        if starts is None or ends is None or (len(slice_.input) > 4 and slice_.input[4]):
            return None, None, None
        axes = list(range(starts.size)) if axes is None else [int(a) % 5 for a in axes.ravel()]
        begin = dict(zip(axes, starts.ravel().tolist()))
        stop = dict(zip(axes, ends.ravel().tolist()))
        if 2 not in begin or stop[2] != begin[2] + 1 or any(v != 0 for a, v in begin.items() if a != 2):
            return None, None, None
        return reshape.input[0], int(begin[2]), rotary or None

    inputs_read = functools.partial(graph_inputs_read, graph, producers)

    def attention_core(attn, value_name):
        """From the `probs @ value` MatMul back to the scores and forward to the output:
        `(query source, slice index, query rotary, scale, bias, key transpose, output Reshape)` or None."""
        if attn.input[1] != value_name:
            return None
        softmax = producer(attn.input[0], "Softmax")
        add = softmax and producer(softmax.input[0], "Add")
        mul = add and (producer(add.input[0], "Mul") or producer(add.input[1], "Mul"))
        scores = mul and (producer(mul.input[0], "MatMul") or producer(mul.input[1], "MatMul"))
        if not scores:
            return None
        bias = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
        scale = _constant_value(model, mul.input[1] if mul.input[0] == scores.output[0] else mul.input[0], producers)
        key_t = producer(scores.input[1], "Transpose")
        perm = next((list(x.ints) for x in key_t.attribute if x.name == "perm"), None) if key_t else None
        x_q, index_q, rotary_q = head_source(scores.input[0])
        out_t = [n for n in consumers.get(attn.output[0], []) if n.op_type == "Transpose"]
        out_r = out_t and [n for n in consumers.get(out_t[0].output[0], []) if n.op_type == "Reshape"]
        if (scale is None or scale.size != 1 or abs(float(scale.ravel()[0]) * head_dim ** 0.5 - 1) > 1e-5
                or perm != [0, 1, 3, 2] or not out_r or not x_q):
            return None
        return x_q, index_q, rotary_q, float(scale.ravel()[0]), bias, key_t, out_r[0]

    replacements = {}  # id(old node) -> [new nodes] (an empty list removes it)
    tables = RotaryTables(model, rotary_rows, "kerasllm_rotary")
    position_ids = {}  # positions tensor -> its int64 Cast (RotaryEmbedding's position_ids)

    def rotary_positions(rotary):
        """`rotary.positions` as int64, cast once: the Cast goes right after the positions'
        producer, so every layer's nodes come after it."""
        if rotary.positions not in position_ids:
            name = f"kerasllm_rotary/position_ids_{len(position_ids)}"
            cast = helper.make_node("Cast", [rotary.positions], [name], to=onnx.TensorProto.INT64, name=f"{name}/Cast")
            source = producers.get(rotary.positions)
            if source is None:  # a graph input: first of all
                source = graph.node[0]
                replacements[id(source)] = [cast, *replacements.get(id(source), [source])]
            else:
                replacements[id(source)] = [*replacements.get(id(source), [source]), cast]
            position_ids[rotary.positions] = cast.output[0]
        return position_ids[rotary.positions]

    fused = 0
    cache_keys = [o.name for o in graph.output if o.name.startswith("present.") and o.name.endswith(".key")]
    for present_key in cache_keys:  # self-attention over a growing cache
        present_value = present_key[:-len("key")] + "value"
        past_key, past_value = (name.replace("present.", "past_key_values.", 1) for name in (present_key, present_value))
        concat_k = producer(present_key, "Concat")
        concat_v = producer(present_value, "Concat")
        if not concat_k or not concat_v or list(concat_k.input[:1]) != [past_key] \
                or list(concat_v.input[:1]) != [past_value]:
            continue
        x_k, index_k, rotary_k = head_source(concat_k.input[1])
        x_v, index_v, rotary_v = head_source(concat_v.input[1])
        attn = [n for n in consumers.get(present_value, []) if n.op_type == "MatMul"]
        core = attention_core(attn[0], present_value) if len(attn) == 1 else None
        if not core:
            continue
        x_q, index_q, rotary_q, scale, bias, key_t, out_r = core
        if key_t.input[0] != present_key or x_q != x_k or x_q != x_v or (index_q, index_k, index_v) != (0, 1, 2):
            continue
        # Queries and keys rotated alike (the same positions and frequencies, every pair of the
        # head), values never; anything else stays unfused.
        if rotary_v or bool(rotary_q) != bool(rotary_k) or (rotary_q and (
                not rotary_rows or rotary_q.angles != rotary_k.angles
                or 2 * len(rotary_q.inverse_frequencies) != head_dim)):
            continue
        prefix = f"kerasllm_attention_{fused}"
        split_sizes = f"{prefix}/split"
        graph.initializer.append(numpy_helper.from_array(np.array([num_heads * head_dim] * 3, np.int64),
                                                         split_sizes))
        qkv = [f"{prefix}/{part}" for part in ("query", "key", "value")]
        split = helper.make_node("Split", [x_q, split_sizes], qkv, name=f"{prefix}/Split", axis=-1)
        rotation = []
        if rotary_q:
            rotation = [rotary_embedding(qkv[i], rotary_positions(rotary_q), tables(rotary_q), num_heads,
                                         f"{prefix}/RotaryEmbedding_{part}") for i, part in ((0, "query"), (1, "key"))]
            qkv = [f"{qkv[0]}/rotary", f"{qkv[1]}/rotary", qkv[2]]
        # A bias computed from shapes alone is the causal mask (a seq2seq decoder's; a causal
        # LM's also reads its attention_mask): the kernel's `unidirectional` applies it, and
        # the ~20 nodes that build it per step go (validation compares the result).
        causal_only = not inputs_read(bias)
        fused_node = helper.make_node(
            "MultiHeadAttention", [*qkv, "", "", "" if causal_only else bias, past_key, past_value],
            [out_r.output[0], present_key, present_value],
            name=f"{prefix}/MultiHeadAttention", domain="com.microsoft", num_heads=num_heads, scale=scale,
            **({"unidirectional": 1} if causal_only else {}),
        )
        replacements[id(out_r)] = [split, *rotation, fused_node]
        replacements[id(concat_k)] = []
        replacements[id(concat_v)] = []
        fused += 1
    # Cross-attention to keys/values computed once per input (a seq2seq decoder's
    # `past_key_values.{i}.encoder.key|value [B, N, S, D]` inputs): MultiHeadAttention
    # takes them as they are (BNSH key/value), the query projection `[B, T, C]` as query.
    # Its bias `[B, 1, 1, S]` (padding only) is expanded to the `[B, 1, T, S]` the kernel
    # wants, once per step for all layers.
    # With the padding mask as the only bias, the query rows are grouped per key row
    # (CROSS_ROWS_METADATA): `[R, T, C]` -> `[B, R / B * T, C]` (B = the keys' rows) before the
    # kernel and back after it, so R rows that share an input (its beams) can share one row of
    # keys/values. Cross-attention has no causal mask: a query attends to its input's keys
    # wherever it sits in the group. With one row per query row (R = B) it is the plain form.
    cross_keys = [i.name for i in graph.input if i.name.startswith("past_key_values.")
                  and i.name.endswith(".encoder.key")]
    expanded = {}  # bias tensor -> its expanded name
    grouped = 0
    for key in cross_keys:
        value = key[:-len("key")] + "value"
        attn = [n for n in consumers.get(value, []) if n.op_type == "MatMul"]
        core = attention_core(attn[0], value) if len(attn) == 1 else None
        if not core:
            continue
        x_q, index_q, rotary_q, scale, bias, key_t, out_r = core
        if key_t.input[0] != key or index_q != 0 or rotary_q:
            continue
        prefix = f"kerasllm_cross_attention_{fused}"
        new_nodes = []
        if inputs_read(bias) == {"encoder_attention_mask"}:
            # The padding bias of the source mask: the kernel's key padding mask (int32 [B, S])
            # adds the same MASK_VALUE to padded keys; one Cast for every layer.
            if "encoder_attention_mask" not in expanded:
                new_nodes.append(helper.make_node("Cast", ["encoder_attention_mask"], [f"{prefix}/key_padding_mask"],
                                                  to=onnx.TensorProto.INT32, name=f"{prefix}/Cast"))
                expanded["encoder_attention_mask"] = f"{prefix}/key_padding_mask"
            # [B, -1, C] from the keys' rows, and the queries' own shape to go back to (every layer's
            # queries have the same): made once, at the first layer.
            if "grouped_shape" not in expanded:
                groups = f"{prefix}/groups"
                graph.initializer.append(numpy_helper.from_array(np.array([-1, 0], np.int64), f"{groups}/tail"))
                new_nodes += [
                    helper.make_node("Shape", [key], [f"{groups}/rows"], start=0, end=1, name=f"{groups}/Shape"),
                    helper.make_node("Concat", [f"{groups}/rows", f"{groups}/tail"], [f"{groups}/shape"], axis=0,
                                     name=f"{groups}/Concat"),
                    helper.make_node("Shape", [x_q], [f"{groups}/query_shape"], name=f"{groups}/QueryShape"),
                ]
                expanded["grouped_shape"], expanded["query_shape"] = f"{groups}/shape", f"{groups}/query_shape"
            new_nodes += [
                helper.make_node("Reshape", [x_q, expanded["grouped_shape"]], [f"{prefix}/grouped_query"],
                                 name=f"{prefix}/GroupQueries"),
                helper.make_node(
                    "MultiHeadAttention",
                    [f"{prefix}/grouped_query", key, value, "", expanded["encoder_attention_mask"]],
                    [f"{prefix}/grouped_output"], name=f"{prefix}/MultiHeadAttention", domain="com.microsoft",
                    num_heads=num_heads, scale=scale, mask_filter_value=MASK_VALUE,
                ),
                helper.make_node("Reshape", [f"{prefix}/grouped_output", expanded["query_shape"]], [out_r.output[0]],
                                 name=f"{prefix}/UngroupQueries"),
            ]
            replacements[id(out_r)] = new_nodes
            fused += 1
            grouped += 1
            continue
        if bias not in expanded:
            one = f"{prefix}/one"
            graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), one))
            new_nodes += [
                helper.make_node("Shape", [x_q], [f"{prefix}/length"], start=1, end=2, name=f"{prefix}/Shape"),
                helper.make_node("Concat", [one, one, f"{prefix}/length", one], [f"{prefix}/bias_shape"], axis=0,
                                 name=f"{prefix}/Concat"),
                helper.make_node("Expand", [bias, f"{prefix}/bias_shape"], [f"{prefix}/bias"],
                                 name=f"{prefix}/Expand"),
            ]
            expanded[bias] = f"{prefix}/bias"
        new_nodes.append(helper.make_node(
            "MultiHeadAttention", [x_q, key, value, "", "", expanded[bias]], [out_r.output[0]],
            name=f"{prefix}/MultiHeadAttention", domain="com.microsoft", num_heads=num_heads, scale=scale,
        ))
        replacements[id(out_r)] = new_nodes
        fused += 1
    if fused:
        replace_nodes(model, replacements)
    if cross_keys and grouped == len(cross_keys):
        entry = model.metadata_props.add()
        entry.key, entry.value = CROSS_ROWS_METADATA, CROSS_ROWS_PER_INPUT
    return fused




def share_kv_buffer(model: onnx.ModelProto, num_heads: int) -> bool:
    """Turn a graph whose every layer `fuse_cached_attention` fused into one that updates a
    fixed-size KV cache in place: each MultiHeadAttention becomes ONNX Runtime's
    `com.microsoft.GroupQueryAttention` (kv_num_heads == num_heads) over a shared
    past/present buffer, the layout ORT GenAI's model builder emits for CPU and CUDA.

    Why: MultiHeadAttention concatenates past and new keys/values into a fresh present
    every step, copying the whole cache (a quarter of a small model's decode step); GQA
    writes the new token's keys/values into the bound buffer and reads the packed QKV
    projection as it is (no Split). The attention bias subgraph becomes dead: GQA masks
    causally from per-row lengths.

    The graph contract changes (runtime.DecoderSession drives it, see there):
    `past_key_values.*` / `present.*` are one `[B, H, max_sequence, D]` buffer bound as
    both; `attention_mask [B, M]` holds each row's tokens so far *right-aligned* — row b
    has ones in its first n_b columns (new tokens included), so `seqlens_k = n_b - 1` and
    `total_sequence_length = M`; a prompt is passed right-padded with an all-ones mask.
    The positions (`positions_from_mask_sum`, `n_b - T + t`) hold in both layouts. CPU
    GQA runs a multi-token step on top of a past only for batch 1; the runtime feeds such
    a step one token at a time. Returns False (graph unchanged) unless every layer is fused.
    """
    graph = model.graph
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    layers = len([i for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")])
    splits = attention_splits(model, attention)
    if not attention or len(attention) != layers or splits is None:
        return False

    producers, _ = graph_index(graph)
    # GQA's rotation uses positions it derives from its lengths: `n_b - T + t`, the graph's own
    # (`positions_from_mask_sum`) only. Rotations at other positions keep MultiHeadAttention.
    positions = _mask_sum_positions(model, producers)
    for node in attention:
        rotation = typed_producer(producers, node.input[0], "RotaryEmbedding")
        cast = rotation and typed_producer(producers, rotation.input[1], "Cast")
        if rotation is not None and (cast is None or positions is None or cast.input[0] != positions.output[0]):
            return False
    prefix = "kerasllm_shared_kv"
    graph.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axis1"),
                              numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/one")])
    seqlens, total = f"{prefix}/seqlens_k", f"{prefix}/total_sequence_length"
    lengths = [
        helper.make_node("ReduceSum", ["attention_mask", f"{prefix}/axis1"], [f"{prefix}/count"], keepdims=0,
                         name=f"{prefix}/ReduceSum"),
        helper.make_node("Sub", [f"{prefix}/count", f"{prefix}/one"], [f"{prefix}/last"], name=f"{prefix}/Sub"),
        helper.make_node("Cast", [f"{prefix}/last"], [seqlens], to=onnx.TensorProto.INT32, name=f"{prefix}/Cast"),
        helper.make_node("Shape", ["attention_mask"], [f"{prefix}/width"], start=1, end=2, name=f"{prefix}/Shape"),
        helper.make_node("Cast", [f"{prefix}/width"], [f"{prefix}/width32"], to=onnx.TensorProto.INT32,
                         name=f"{prefix}/CastWidth"),
        helper.make_node("Squeeze", [f"{prefix}/width32"], [total], name=f"{prefix}/Squeeze"),
    ]
    lengths += _lean_positions(model, producers, prefix)
    to_group_query_attention(model, attention, splits, num_heads, lengths, seqlens, total,
                             is_cache=lambda name: name.startswith(("past_key_values.", "present.")))
    return True


def attention_splits(model: onnx.ModelProto, attention: list) -> list | None:
    """The Split feeding q, k and v of each fused MultiHeadAttention (`fuse_cached_attention`'s
    form), or None when one is not fed that way."""
    producers, _ = graph_index(model.graph)

    def unrotated(name):  # q and k may come through RotaryEmbedding (fuse_cached_attention's rotary form)
        rotation = typed_producer(producers, name, "RotaryEmbedding")
        return rotation.input[0] if rotation is not None else name

    splits = [typed_producer(producers, unrotated(node.input[0]), "Split") for node in attention]
    if any(s is None or list(s.output) != [unrotated(name) for name in node.input[:3]]
           for s, node in zip(splits, attention)):
        return None
    return splits


def group_query_attention_problem(head_dim: int, rotary: bool) -> str | None:
    """Why ONNX Runtime's GroupQueryAttention cannot run heads of `head_dim`, or None.

    Its kernel (ORT 1.31) takes head sizes that are multiples of 8, and of 16 with the rotation
    inside (`do_rotary`: cos/sin tables of head_dim / 2 columns, a multiple of 8), but says so
    only when the graph runs. The decoder and seq2seq exports ask it from the config before they
    ask for the in-place buffer (`share_kv_buffer`, `seq2seq_export.share_self_attention_buffer`),
    and keep the growing cache for such models."""
    multiple = 16 if rotary else 8
    if head_dim % multiple:
        return (f"ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of {multiple}"
                f"{' with rotary positions' if rotary else ''}, this model's is {head_dim}")
    return None


def to_group_query_attention(model: onnx.ModelProto, attention: list, splits: list, num_heads: int, lengths: list,
                             seqlens: str, total: str, is_cache) -> None:
    """Replace each fused MultiHeadAttention by `com.microsoft.GroupQueryAttention` (kv_num_heads ==
    num_heads) reading its Split's packed QKV and its past key/value as a buffer written in place,
    with `seqlens` / `total` (computed by `lengths`, nodes that read graph inputs only, put
    first); the cache tensors (`is_cache(name)`) get the axis name `max_sequence`, and the
    graph's metadata says it updates a shared buffer. The decoder family (`share_kv_buffer`) and
    the seq2seq decoder's self-attention (`seq2seq_export.share_self_attention_buffer`) use it."""
    graph = model.graph
    producers, _ = graph_index(graph)
    replacements = {}
    for node, split in zip(attention, splits):
        scale = next(a.f for a in node.attribute if a.name == "scale")
        # Rotated q/k: GQA rotates the packed projection itself, at the positions its lengths
        # imply (the caller checks they are the graph's), from the same cos/sin tables.
        rotation = typed_producer(producers, node.input[0], "RotaryEmbedding")
        tables = list(rotation.input[2:4]) if rotation is not None else []
        replacements[id(node)] = [helper.make_node(
            "GroupQueryAttention", [split.input[0], "", "", node.input[6], node.input[7], seqlens, total, *tables],
            list(node.output), name=node.name.replace("MultiHeadAttention", "GroupQueryAttention"),
            domain="com.microsoft", num_heads=num_heads, kv_num_heads=num_heads, scale=scale,
            **({"do_rotary": 1, "rotary_interleaved": 0} if tables else {}),
        )]
    first = graph.node[0]
    replacements[id(first)] = lengths + replacements.get(id(first), [first])
    replace_nodes(model, replacements)
    for value in list(graph.input) + list(graph.output):
        if is_cache(value.name):
            value.type.tensor_type.shape.dim[2].dim_param = "max_sequence"
    entry = model.metadata_props.add()
    entry.key, entry.value = KV_CACHE_METADATA, SHARED_BUFFER


LOGITS_TO_KEEP = "logits_to_keep"
# Normalizations whose first output keeps the [B, T, C] shape of their input.
_NORMS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
          "SkipSimplifiedLayerNormalization")


def keep_last_logits(model: onnx.ModelProto) -> bool:
    """Give a decoder graph the optional input `logits_to_keep` (int64 `[1]`, Hugging Face's
    name and meaning): the logits of the last k positions only, 0 (the default, an
    overridable initializer) for every position.

    Why: a prompt step needs one position's logits to pick the next token, and computing
    `[B, T, V]` costs the vocabulary projection for every prompt token (a batch-8 x
    32-token prompt on the small preset: 4.7 -> 3.3 ms). A `Slice(hidden, -k, end)` on the
    lm head's input does it; callers that do not feed the input (validation, ORT GenAI)
    get every position as before. Matched on `logits = MatMul(norm(...), W)` (+ bias Adds,
    any of `_NORMS`); returns False (graph unchanged) when the graph has another shape.
    """
    graph = model.graph
    producers, _ = graph_index(graph)
    initializers = {i.name for i in graph.initializer}
    node = producers.get("logits")
    while node is not None and node.op_type == "Add":
        data = [name for name in node.input if name not in initializers]
        node = producers.get(data[0]) if len(data) == 1 else None
    norm = producers.get(node.input[0]) if node is not None and node.op_type == "MatMul" else None
    if norm is None or norm.op_type not in _NORMS or norm.output[0] != node.input[0]:
        return False
    prefix = "kerasllm_logits_to_keep"
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), LOGITS_TO_KEEP),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{prefix}/end"),
                              numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axis")])
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, onnx.TensorProto.INT64, [1]))
    kept = f"{prefix}/hidden"
    nodes = [helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{prefix}/start"], name=f"{prefix}/Neg"),
             helper.make_node("Slice", [node.input[0], f"{prefix}/start", f"{prefix}/end", f"{prefix}/axis"], [kept],
                              name=f"{prefix}/Slice")]
    node.input[0] = kept
    replace_nodes(model, {id(node): nodes + [node]})
    return True


def add_next_token(model: onnx.ModelProto, suppressed_ids: Sequence[int] = ()) -> None:
    """Give a decoder graph the output `next_token` (int64 `[B, 1]`): the argmax of the last
    position's logits, greedy decoding's choice, computed where the graph runs. With
    `suppressed_ids` (generate.DecodingOptions.suppress_ids) the argmax skips those ids (a
    constant -inf added to their logits), and the graph's metadata lists them
    (SUPPRESSED_METADATA), so the runtime chooses there only for options that suppress the same.

    Why: on a GPU a step's logits (`[B, 1, V]` float32, 6.4 MB at batch 32 with GPT-2's 50,257
    tokens) otherwise cross to the host every step and are searched there; with this output
    only B token ids cross (runtime.DecoderSession.greedy_step). The input shape of the next
    step, `[B, 1]`, so ids can be fed back as they come. Added to fp16 graphs only (the GPU
    fast path): every node runs whether its output is asked for or not, and ORT's CPU ArgMax
    is ~10x slower than NumPy's (2.0 vs 0.2 ms at 32 x 50,257, one thread), so fp32 (CPU)
    graphs leave the choice to the host. Ties go to the first index, as NumPy's argmax.
    """
    graph = model.graph
    prefix = "kerasllm_next_token"
    graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}/start"),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{prefix}/end"),
                              numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axis")])
    nodes = [helper.make_node("Slice", ["logits", f"{prefix}/start", f"{prefix}/end", f"{prefix}/axis"],
                              [f"{prefix}/last"], name=f"{prefix}/Slice")]
    chosen_from = f"{prefix}/last"
    if suppressed_ids:
        logits = next(o for o in graph.output if o.name == "logits").type.tensor_type
        vocab = logits.shape.dim[-1].dim_value
        if not vocab:
            raise ValueError("add_next_token: suppressing ids needs the logits' vocabulary size in the graph")
        bias = np.zeros(vocab, onnx.helper.tensor_dtype_to_np_dtype(logits.elem_type))
        bias[list(suppressed_ids)] = -np.inf
        graph.initializer.append(numpy_helper.from_array(bias, f"{prefix}/suppress"))
        nodes.append(helper.make_node("Add", [chosen_from, f"{prefix}/suppress"], [f"{prefix}/allowed"],
                                      name=f"{prefix}/Suppress"))
        chosen_from = f"{prefix}/allowed"
        entry = model.metadata_props.add()
        entry.key, entry.value = SUPPRESSED_METADATA, json.dumps(sorted(int(i) for i in suppressed_ids))
    nodes.append(helper.make_node("ArgMax", [chosen_from], [NEXT_TOKEN], name=f"{prefix}/ArgMax", axis=-1,
                                  keepdims=0))
    graph.node.extend(nodes)
    graph.output.append(helper.make_tensor_value_info(NEXT_TOKEN, onnx.TensorProto.INT64, ["batch", 1]))


def _mask_sum_positions(model: onnx.ModelProto, producers):
    """The node computing the decoder's positions from its attention mask (`positions_from_mask_sum`,
    `n_b - T + t`), matched on `Max(Add(Sub(ReduceSum(Cast?(attention_mask)), T), offsets), 0)`;
    None if the graph computes them another way."""
    node = functools.partial(typed_producer, producers)
    for max_node in model.graph.node:
        if max_node.op_type != "Max" or len(max_node.input) != 2:
            continue
        zero = _constant_value(model, max_node.input[1], producers)
        add = node(max_node.input[0], "Add")
        sub = add and (node(add.input[0], "Sub") or node(add.input[1], "Sub"))
        total = sub and node(sub.input[0], "ReduceSum")
        source = total and (node(total.input[0], "Cast") or None)
        mask = source.input[0] if source else (total.input[0] if total else None)
        if zero is not None and zero.size == 1 and float(zero.ravel()[0]) == 0 and mask == "attention_mask":
            return max_node
    return None


def _lean_positions(model: onnx.ModelProto, producers, prefix: str) -> list:
    """New nodes computing the decoder's positions (`positions_from_mask_sum`) from the graph
    inputs, rewiring the traced result's consumers to them: 8 nodes for tf2onnx's 11 (int32
    casts and strided-slice bookkeeping around the same arithmetic); no nodes if the graph
    computes its positions another way (`_mask_sum_positions`).

    `n_b - T + t` is computed as `count_b + range(-T, 0)`: on a GPU the mask's row sums stay on
    the device, and T (the input's shape, on the host) only feeds Range's bounds, which ORT's
    CUDA kernel reads on the host. Subtracting T from the device sums instead would put a
    host-to-device copy into every step, and ORT refuses to capture a graph with copies in a
    CUDA graph.
    """

    graph = model.graph
    max_node = _mask_sum_positions(model, producers)
    if max_node is not None:
        old, dtype = max_node.output[0], onnx.TensorProto.INT32  # positions_from_mask_sum's dtype
        graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), f"{prefix}/zero"),
                                  numpy_helper.from_array(np.array(1, np.int64), f"{prefix}/one_scalar")])
        names = {k: f"{prefix}/positions_{k}" for k in ("count", "length", "length0", "start", "offsets", "sum",
                                                         "int64")}
        nodes = [
            helper.make_node("ReduceSum", ["attention_mask", f"{prefix}/axis1"], [names["count"]], keepdims=1,
                             name=f"{prefix}/PositionsReduceSum"),
            helper.make_node("Shape", ["input_ids"], [names["length"]], start=1, end=2, name=f"{prefix}/PositionsShape"),
            helper.make_node("Squeeze", [names["length"]], [names["length0"]], name=f"{prefix}/PositionsSqueeze"),
            helper.make_node("Neg", [names["length0"]], [names["start"]], name=f"{prefix}/PositionsNeg"),
            helper.make_node("Range", [names["start"], f"{prefix}/zero", f"{prefix}/one_scalar"], [names["offsets"]],
                             name=f"{prefix}/PositionsRange"),
            helper.make_node("Add", [names["count"], names["offsets"]], [names["sum"]], name=f"{prefix}/PositionsAdd"),
            helper.make_node("Max", [names["sum"], f"{prefix}/zero"], [names["int64"]], name=f"{prefix}/PositionsMax"),
            # The traced positions were int32: consumers keep their input type.
            helper.make_node("Cast", [names["int64"]], [old + "/lean"], to=dtype, name=f"{prefix}/PositionsCast"),
        ]
        for consumer in graph.node:
            for k, name in enumerate(consumer.input):
                if name == old:
                    consumer.input[k] = old + "/lean"
        return nodes
    return []


# Tensors larger than this are set aside while the optimizer runs (see `_set_aside_weights`).
_SET_ASIDE_BYTES = 1 << 16


def _set_aside_weights(model: onnx.ModelProto) -> dict[str, bytes]:
    """Move large initializers' bytes out of `model`, leaving external-data stubs.

    With symbolic shape inference on, the transformer optimizer copies the whole model four
    times and again in several fusions (protobuf `CopyFrom`): on a GPT-2-small graph that
    took 105 of its 164 s and most of the memory. Shape inference and the fusions only
    need the weights' shapes (dims stay) and the small constants (kept: biases, epsilons,
    0.5, sqrt 2); a fusion that would read a set-aside weight fails loudly, never silently.
    """
    stash = {}
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) > _SET_ASIDE_BYTES:
            stash[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", "kerasllm-set-aside-weights"
    return stash


def _restore_weights(model: onnx.ModelProto, stash: dict[str, bytes]) -> None:
    for tensor in model.graph.initializer:
        if tensor.name in stash and tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = stash[tensor.name]


def cpu_slower_fusions(dtype: str) -> tuple[str, ...]:
    """The `disabled_fusions` of every family's export in `dtype`. fp32 bundles are tuned for the
    CPU, where ORT 1.31's SkipLayerNormalization is slower than the LayerNormalization + Add it
    replaces (a decoder step 4-6%, small preset, batch 8 and 32; encoder 651 vs 733 seq/s, its
    kernel 20.8 vs 8.8 ms a 64 x 128 batch). fp16 is the GPU export, where it is one kernel
    launch instead of three."""
    return ("skip_layer_norm",) if dtype == "fp32" else ()


@contextlib.contextmanager
def _quiet_scratch_dir():
    """Run onnxruntime.transformers' optimizer or fp16 converter: its log lines (at WARNING and
    below, under top-level logger names) silenced, and in a scratch working directory. When its
    symbolic shape inference gives up it writes sym_shape_infer_temp.onnx and uuid-named .data
    files into the working directory: kept out of the user's (and the repository's, in tests)."""
    logging.disable(logging.WARNING)
    cwd = os.getcwd()
    scratch = tempfile.TemporaryDirectory(prefix="kerasllm-optimize-")
    os.chdir(scratch.name)
    try:
        yield
    finally:
        os.chdir(cwd)
        scratch.cleanup()
        logging.disable(logging.NOTSET)


def optimize_graph(source: str | Path | onnx.ModelProto, target: str | Path, *, model_type: str, num_heads: int,
                   hidden_size: int, fuse: bool = True, dtype: str = "fp32",
                   keep_float32_io: tuple[str, ...] = ("logits",), shape_inference: bool = True,
                   disabled_fusions: tuple[str, ...] = (), cached_attention: bool = False,
                   shared_kv_buffer: bool = False, rotary_positions: int = 0, next_token: bool = False,
                   suppressed_ids: Sequence[int] = ()) -> dict:
    """Fuse (optional) and convert (fp16 optional) a graph, save it at `target`.

    Args:
        source: a path or a `ModelProto` (consumed: its weights move to the result).
        model_type: the transformer optimizer's model type ("gpt2" for decoders, "bert" for encoders).
        num_heads, hidden_size: the model's shape (the attention fusion needs them).
        fuse: run the transformer fusions.
        dtype: "fp32" or "fp16".
        keep_float32_io: float graph inputs/outputs that stay float32 in fp16 graphs.
        shape_inference: let the fusions run ONNX Runtime's symbolic shape inference
            (`FusionOptions.enable_shape_inference`). It guards SkipLayerNormalization
            against broadcasting Adds and takes ~45 s on a GPT-2-small graph (sympy over the
            shape arithmetic, four times). The decoder turns it off: its residual Adds never
            broadcast (and validation would catch a wrong fusion).
        disabled_fusions: `FusionOptions` switches to turn off (`"skip_layer_norm"` ->
            `enable_skip_layer_norm = False`), for fusions measured to be slower on a family.
        cached_attention: fuse kerasllm's growing-cache self-attention (`fuse_cached_attention`).
        shared_kv_buffer: then, if every layer fused, switch the graph to an in-place KV
            buffer (`share_kv_buffer`; decoder graphs only), and give it the optional input
            `logits_to_keep` (`keep_last_logits`).
        rotary_positions: with `cached_attention`, also fuse self-attention with rotary
            positions, with cos/sin tables for positions below this (0: leave it unfused).
        next_token: add the output `next_token`, greedy decoding's choice (`add_next_token`),
            never one of `suppressed_ids`.
    Returns what was done: `{"fusions": {op: count}, "kv_cache": "growing" | "shared_buffer", "dtype",
    "nodes_before", "nodes_after", ...}`.
    """
    from onnxruntime.transformers import optimizer  # noqa: PLC0415 - slow import, export time only
    from onnxruntime.transformers.fusion_options import FusionOptions  # noqa: PLC0415
    from onnxruntime.transformers.onnx_model import OnnxModel  # noqa: PLC0415

    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be fp32 or fp16, got {dtype!r}")
    original = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source))
    before = _op_counts(original)
    kv_cache = "growing"
    if fuse and cached_attention:
        fuse_cached_attention(original, num_heads, hidden_size // num_heads, rotary_rows=rotary_positions)
        if shared_kv_buffer and share_kv_buffer(original, num_heads):
            kv_cache = SHARED_BUFFER
    # Without shape inference nothing copies the model: the weights can stay.
    stash = _set_aside_weights(original) if fuse and shape_inference else {}
    if fuse:
        options = FusionOptions(model_type)
        options.enable_shape_inference = shape_inference
        for name in disabled_fusions:
            setattr(options, f"enable_{name}", False)
        # The optimizer's modules log each fusion at INFO and warn that the producer is not
        # PyTorch, under top-level logger names; the caller reports the fusions instead.
        with _quiet_scratch_dir():
            model = optimizer.optimize_model(
                original, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
                optimization_options=options, only_onnxruntime=False,
            )
    else:
        model = OnnxModel(original)
    _restore_weights(model.model, stash)
    del stash
    after_fusion = _op_counts(model.model)
    fused = {op: after_fusion[op] - before[op] for op in FUSED_OPS if after_fusion[op] > before[op]}
    report = {"transformer_fusions": fuse, "model_type": model_type, "fusions": fused, "kv_cache": kv_cache,
              "disabled_fusions": list(disabled_fusions),
              "nodes_before": sum(before.values()), "dtype": dtype,
              "session_graph_optimization_level": "ORT_ENABLE_ALL"}
    if dtype == "fp16":
        # It logs "Removed 1 cascaded Cast nodes" (INFO) and, when its symbolic shape inference
        # fails (growing-cache graphs), that some useless Casts may stay (harmless).
        with _quiet_scratch_dir():
            model.convert_float_to_float16(keep_io_types=list(keep_float32_io), op_block_list=FP16_BLOCKED_OPS)
        report["fp16_blocked_ops"] = FP16_BLOCKED_OPS
        report["renamed_nodes"] = dedupe_node_names(model.model)
    proto = model.model
    if kv_cache == SHARED_BUFFER:
        report[LOGITS_TO_KEEP] = keep_last_logits(proto)
    if next_token:
        add_next_token(proto, suppressed_ids)
        report[NEXT_TOKEN] = True
        if suppressed_ids:
            report["next_token_suppressed_ids"] = sorted(int(i) for i in suppressed_ids)
    proto.ir_version = IR_VERSION
    report["nodes_after"] = len(proto.graph.node)
    save_onnx(proto, target)
    return report

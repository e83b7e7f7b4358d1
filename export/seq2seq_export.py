"""The encoder-decoder family's export: `encoder.onnx` + `decoder.onnx` (Keras side, imports TensorFlow).

The declarations (`seq2seq_graphs`) are all this family adds to convert.py; the I/O
names are documented in seq2seq_runtime.py. The encoder computes the cross-attention
keys/values of every decoder layer once per input; the decoder graph takes them as
inputs next to its growing self-attention cache, so a decoding step costs one token.

`export_seq2seq_family` plugs the family into exporter.py (convert, optimize, validate).
Validation (`validate_seq2seq`), on shapes never used while tracing:
* encoder: cross keys/values of right-padded batches (batch 1 and batch 3) within 1e-4;
* decoder: a BOS step (past 0), then a 3-token step (less where max_length < 4) on top of its
  past: logits and presents within 1e-4 (fp32) or top-1 agreement >= 99% (fp16);
* fp32: greedy translations of a few inputs token-identical between `Seq2SeqLM.generate`
  (Keras, XLA) and the bundle's decoding loop (generate.py) over ONNX Runtime.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kerasllm.errors import KerasLLMError
from kerasllm.export.convert import (GraphSpec, TensorDecl, graph_index, graph_inputs_read, save_onnx,
                                     trace_to_onnx, typed_producer)
from kerasllm.export.optimize import (attention_splits, cpu_slower_fusions, group_query_attention_problem,
                                      optimize_graph, to_group_query_attention)
from kerasllm.export.runtime import NEXT_TOKEN, SHARED_BUFFER
from kerasllm.export.seq2seq_runtime import (SEQLENS_K, TOTAL_SEQUENCE_LENGTH, Seq2SeqSessions, Seq2SeqStep,
                                              cross_names, self_attention_slots_bound, self_names)
from kerasllm.export.token_packing import pack_padded_tokens
from kerasllm.export.validate import ValidationError, check_same_choices, compare_output, validated_with_fallback

GREEDY_NEW_TOKENS = 24


def _sorted(decls: dict) -> dict:
    """Outputs in the order tf2onnx gives a function's dict outputs (sorted names)."""
    return {name: decls[name] for name in sorted(decls)}


def seq2seq_graphs(model) -> tuple[GraphSpec, GraphSpec]:
    """The encoder and decoder graphs of a `Seq2SeqLM`."""
    import tensorflow as tf  # noqa: PLC0415 - Keras side

    c = model.config
    layers = c.decoder_layers
    cross_kv = ["batch", c.num_heads, "encoder_sequence", c.head_dim]

    def encoder_forward(input_ids, attention_mask):
        hidden, keys, values = model.encode(tf.cast(input_ids, "int32"), attention_mask)
        result = {"last_hidden_state": hidden}
        for i, (key, value) in enumerate(zip(keys, values)):
            result[f"present.{i}.encoder.key"] = key
            result[f"present.{i}.encoder.value"] = value
        return result

    encoder = GraphSpec(
        "encoder", "encoder.onnx",
        {"input_ids": TensorDecl("int64", ["batch", "encoder_sequence"]),
         "attention_mask": TensorDecl("int64", ["batch", "encoder_sequence"])},
        _sorted({"last_hidden_state": TensorDecl("float32", ["batch", "encoder_sequence", c.hidden_dim]),
                 **{name: TensorDecl("float32", cross_kv) for name in cross_names(layers, "present")}}),
        encoder_forward,
    )

    def decoder_forward(input_ids, encoder_attention_mask, **cache):
        def layer_list(prefix, side, kind):
            return [cache[f"{prefix}.{i}.{side}.{kind}"] for i in range(layers)]

        logits, keys, values = model.decode_with_cache(
            tf.cast(input_ids, "int32"), encoder_attention_mask,
            layer_list("past_key_values", "encoder", "key"), layer_list("past_key_values", "encoder", "value"),
            layer_list("past_key_values", "decoder", "key"), layer_list("past_key_values", "decoder", "value"),
        )
        result = {"logits": logits}
        for i, (key, value) in enumerate(zip(keys, values)):
            result[f"present.{i}.decoder.key"] = key
            result[f"present.{i}.decoder.value"] = value
        return result

    past_kv = ["batch", c.num_heads, "past_sequence", c.head_dim]
    decoder = GraphSpec(
        "decoder", "decoder.onnx",
        {"input_ids": TensorDecl("int64", ["batch", "sequence"]),
         "encoder_attention_mask": TensorDecl("int64", ["batch", "encoder_sequence"]),
         **{name: TensorDecl("float32", cross_kv) for name in cross_names(layers, "past_key_values")},
         **{name: TensorDecl("float32", past_kv) for name in self_names(layers, "past_key_values")}},
        _sorted({"logits": TensorDecl("float32", ["batch", "sequence", c.target_vocab]),
                 **{name: TensorDecl("float32", ["batch", c.num_heads, "total_sequence", c.head_dim])
                    for name in self_names(layers, "present")}}),
        decoder_forward,
    )
    return encoder, decoder


def share_self_attention_buffer(model, num_heads: int) -> bool:
    """The seq2seq decoder's self-attention over an in-place KV buffer (as optimize.share_kv_buffer
    does for the decoder family): each self-attention `MultiHeadAttention` (after its Split, see
    optimize.fuse_cached_attention) becomes `com.microsoft.GroupQueryAttention` (kv_num_heads ==
    num_heads) reading the packed QKV projection, with `past_key_values.{i}.decoder.*` and
    `present.{i}.decoder.*` one `[B, H, max_sequence, D]` buffer bound as both; the
    cross-attention keeps its MultiHeadAttention over the encoder's keys/values.

    Why: the growing cache concatenates past and new keys/values into a fresh present every
    step (a copy of the whole cache and new allocations); GQA writes the new token's slot in
    place, and the runtime binds once per batch. A decode step in a 32-step loop, 'small'
    preset: batch 16 on 2 threads 1.05 -> 0.86 ms, batch 8 on 1 thread 0.74 -> 0.61 ms.

    The graph takes one new token per row (`input_ids [B, 1]`; a decoder row is never padded:
    every row starts with BOS) and gains two inputs, GroupQueryAttention's own: `seqlens_k [B]`
    (int32), the tokens before the new one (so also the new token's position), and
    `total_sequence_length` (int32 scalar), the buffer's slots. The positions the traced graph
    took from the past's shape (`Squeeze(Slice(Cast(Shape(past_key_values.0.decoder.key))))`)
    become `seqlens_k` as `[B, 1]`, read by the position embedding's Gather (tf2onnx's broadcast
    to [B, T] goes). Until 2026-12-05 the graph derived both from an `attention_mask [B,
    max_sequence]` input in 12 shape nodes (ReduceSum, Sub, Squeeze, Cast, Shape, Range, ...):
    a 16-row step with the lengths as inputs took 496 instead of 517 us (ORT, one thread,
    alternating loops of 200 steps); the runtime still drives such older bundles. CPU GQA runs a
    multi-token step on top of a past only at batch 1: the runtime feeds one token at a time.
    Returns False (graph unchanged) unless every layer's self-attention was fused and the past
    length is found.
    """
    graph = model.graph
    producers, consumers = graph_index(graph)
    self_attention = [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"
                      and len(n.input) >= 8 and n.input[6].endswith(".decoder.key")]
    layers = len([i for i in graph.input if i.name.endswith(".decoder.key")])
    splits = attention_splits(model, self_attention)
    if not self_attention or len(self_attention) != layers or splits is None:
        return False
    # Rotated q/k (RotaryEmbedding before each MultiHeadAttention): GQA rotates at position
    # `seqlens_k` itself, the traced `past length + range(1)`, positions made from shapes alone.
    for node in self_attention:
        rotation = typed_producer(producers, node.input[0], "RotaryEmbedding")
        if rotation is not None and graph_inputs_read(graph, producers, rotation.input[1]):
            return False
    past_length = next((n for n in graph.node if n.op_type == "Shape" and n.input[0] == "past_key_values.0.decoder.key"),
                       None)
    for op_type in ("Cast", "Slice", "Squeeze"):
        following = [n for n in consumers.get(past_length.output[0], []) if n.op_type == op_type] if past_length else []
        past_length = following[0] if len(following) == 1 else None
    if past_length is None:
        return False

    p = "kerasllm_shared_kv"
    int32 = onnx.TensorProto.INT32
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{p}/axis1"))
    # One new token per row: its position, the tokens before it, is `seqlens_k` itself.
    lengths = [helper.make_node("Unsqueeze", [SEQLENS_K, f"{p}/axis1"], [f"{p}/past32"], name=f"{p}/Unsqueeze")]
    # The traced past length is an int32 scalar added to `range(T)`: a [B, 1] past broadcasts the same way.
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == past_length.output[0]:
                node.input[k] = f"{p}/past32"
    # Where that sum only feeds the position embedding's Gather (through tf2onnx's broadcast to
    # [B, T]), the Gather reads the [B, 1] positions directly (T is 1).
    _, consumers = graph_index(graph)
    add = [n for n in consumers.get(f"{p}/past32", []) if n.op_type == "Add"]
    expand = [n for n in consumers.get(add[0].output[0], []) if n.op_type == "Expand"] if len(add) == 1 else []
    gather = [n for n in consumers.get(expand[0].output[0], []) if n.op_type == "Gather"] if len(expand) == 1 else []
    if len(gather) == 1 and len(consumers[add[0].output[0]]) == 1 and len(consumers[expand[0].output[0]]) == 1:
        gather[0].input[1] = f"{p}/past32"
    for node in graph.node:  # token ids: Gather takes int64 indices, tf2onnx's int32 Cast goes
        if node.op_type == "Gather" and node.input[1] in producers and producers[node.input[1]].op_type == "Cast" \
                and producers[node.input[1]].input[0] == "input_ids":
            node.input[1] = "input_ids"
    graph.input.insert(1, helper.make_tensor_value_info(SEQLENS_K, int32, ["batch"]))
    graph.input.insert(2, helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, int32, []))
    to_group_query_attention(model, self_attention, splits, num_heads, lengths, SEQLENS_K, TOTAL_SEQUENCE_LENGTH,
                             is_cache=lambda name: name.startswith(("past_key_values.", "present."))
                             and ".decoder." in name)  # replace_nodes drops what went dead
    return True


class KerasSeq2SeqSessions:
    """`Seq2SeqLM.encode` / `decode_with_cache` with the interface of `Seq2SeqSessions`.

    The Keras reference for validation, and the model-dir translator's step for the
    decoding options Keras generation lacks. Tensors are numpy arrays.
    """

    # Seq2SeqStep gathers rows through `rows()` (NumPy here), not ORT-wrapped host buffers.
    host_buffers = False

    def __init__(self, model):
        import tensorflow as tf  # noqa: PLC0415

        self.model = model
        c = model.config
        self.num_heads, self.head_dim, self.layers = c.num_heads, c.head_dim, c.decoder_layers
        self._encode = tf.function(model.encode, reduce_retracing=True)
        self._decode = tf.function(model.decode_with_cache, reduce_retracing=True)

    def encode(self, input_ids, attention_mask):
        _, keys, values = self._encode(np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int64))
        return [np.asarray(x) for pair in zip(keys, values) for x in pair]

    def step(self, input_ids, encoder_mask, cross, past, greedy: bool = False):
        # `greedy` asks for a graph's own choice of token; Keras has none (greedy_on_device is
        # False for these sessions), so the shared loops never set it here.
        if greedy:
            raise ValueError("the Keras reference sessions return logits only")
        if past is None:
            empty = np.zeros((input_ids.shape[0], self.num_heads, 0, self.head_dim), np.float32)
            past = [empty] * (2 * self.layers)
        with warnings.catch_warnings():  # Keras warns about a softmax over one key (the BOS step): intended
            warnings.simplefilter("ignore", UserWarning)
            logits, keys, values = self._decode(np.asarray(input_ids, np.int32),
                                                np.asarray(encoder_mask, np.int64), list(cross[0::2]),
                                                list(cross[1::2]), list(past[0::2]), list(past[1::2]))
        return np.asarray(logits), [np.asarray(x) for pair in zip(keys, values) for x in pair]

    def rows(self, values, indices):
        return [value[indices] for value in values]

    def presents(self, past):
        return past

    reorder = rows


def parity_batches(config, seed: int = 0):
    """Right-padded source batches `(ids, mask)` with lengths unlike any traced shape."""
    rng = np.random.default_rng(seed)
    low = min(6, config.vocab_size - 1)
    for batch, length in ((1, 5), (3, 11)):
        length = min(length, config.max_length)
        ids = rng.integers(low, config.vocab_size, (batch, length)).astype(np.int64)
        mask = np.ones((batch, length), np.int64)
        for row in range(1, batch):
            real = int(rng.integers(1, length + 1))
            ids[row, real:] = config.pad_id
            mask[row, real:] = 0
        yield f"batch {batch}", ids, mask


def validate_seq2seq(model, sessions: Seq2SeqSessions, dtype: str = "fp32", greedy: bool = True) -> dict:
    """Compare the ONNX Runtime `sessions` with `model`; returns the figures, raises `ValidationError`."""
    c = model.config
    if c.max_length < 2:  # no room for a new token, nor for any case (not a failed check: no fallback)
        raise KerasLLMError(f"validation: a seq2seq model of max_length {c.max_length} cannot be checked (it needs "
                            "2 positions or more: BOS and a new token)")
    keras_sessions = KerasSeq2SeqSessions(model)
    fp16 = dtype == "fp16"
    figures: dict = {"dtype": dtype, "cases": []}
    rng = np.random.default_rng(1)
    step = min(3, c.max_length - 1)  # the multi-token step after BOS, within max_length
    for name, ids, mask in parity_batches(c):
        ref_cross, cross = keras_sessions.encode(ids, mask), sessions.encode(ids, mask)
        # Padded positions of the cross keys/values are never attended to: compare real ones.
        real = mask.astype(bool)
        for i, (ref, got) in enumerate(zip(ref_cross, cross)):
            got = got.numpy()
            ref_real, got_real = (np.transpose(x, (0, 2, 1, 3))[real] for x in (ref, got))
            compare_output(f"{name}: {sessions.cross_outputs[i]}", ref_real, got_real, fp16, figures)
        start = np.full((len(ids), 1), c.bos_id, np.int64)
        chunk = rng.integers(min(6, c.target_vocab - 1), c.target_vocab, (len(ids), step)).astype(np.int64)
        ref_past = got_past = None
        for step_name, tokens in (("BOS step", start), (f"{step}-token step with past", chunk)):
            ref_logits, ref_past = keras_sessions.step(tokens, mask, ref_cross, ref_past)
            logits, got_past = sessions.step(tokens, mask, cross, got_past)
            compare_output(f"{name}, {step_name}: logits", ref_logits, logits, fp16, figures, logits=True)
            for i, (ref, got) in enumerate(zip(ref_past, sessions.presents(got_past))):
                compare_output(f"{name}, {step_name}: {sessions.present_names[i]}", ref, got, fp16, figures)
        figures["cases"].append({"name": name, "source_lengths": mask.sum(1).tolist(), "steps": [1, step]})
    if sessions.cross_per_input:
        figures["rows_per_input"] = check_rows_per_input(keras_sessions, sessions, c, fp16, figures)
    if greedy and not fp16:
        figures["greedy"] = check_greedy(model, sessions)
    if sessions.greedy_on_device:
        figures["greedy_on_device"] = check_greedy_on_device(c, sessions)
    return figures


def check_rows_per_input(keras_sessions, sessions, config, fp16: bool, figures: dict, rows: int = 3) -> dict:
    """A decoder whose cross-attention groups its query rows per input (`cross_per_input`) must give
    `rows` rows of each input (different tokens: beams) attending to that input's one row of cross
    keys/values the logits Keras gives with the keys/values copied for every row."""
    name, ids, mask = list(parity_batches(config, seed=4))[-1]
    expand = np.repeat(np.arange(len(ids)), rows)
    ref_cross, cross = keras_sessions.encode(ids[expand], mask[expand]), sessions.encode(ids, mask)
    rng = np.random.default_rng(5)
    tokens = np.full((len(expand), 1), config.bos_id, np.int64)
    ref_past = got_past = None
    for step in range(2):
        ref_logits, ref_past = keras_sessions.step(tokens, mask[expand], ref_cross, ref_past)
        logits, got_past = sessions.step(tokens, mask, cross, got_past)
        compare_output(f"{name}, {rows} rows per input, step {step + 1}: logits", ref_logits, logits, fp16, figures,
                       logits=True)
        tokens = rng.integers(min(6, config.target_vocab - 1), config.target_vocab, (len(expand), 1)).astype(np.int64)
    return {"inputs": len(ids), "rows_per_input": rows, "steps": 2}


def check_greedy_on_device(config, sessions) -> dict:
    """The decoder's `next_token` output (optimize.add_next_token) must choose as the host does
    from the same logits: greedy translations both ways, token for token."""
    from kerasllm.export.generate import DecodingOptions, generate  # noqa: PLC0415

    c = config
    sources, new = _greedy_sources(np.random.default_rng(3), c)
    options = DecodingOptions(max_new_tokens=new, stop_ids=(c.eos_id,), suppress_ids=c.suppressed_ids)
    on_device, on_host = (translate_ids(sessions, sources, options, c.pad_id, c.bos_id, c.max_length, generate,
                                        choice_on_host=host) for host in (False, True))
    check_same_choices(on_device, on_host, "greedy translation of source")
    return {"sources": len(sources), "max_new_tokens": new, "identical": True}


def check_greedy(model, sessions) -> dict:
    """Greedy translations in Keras (`Seq2SeqLM.generate`, XLA) and on ONNX Runtime must be identical."""
    from kerasllm.export.generate import DecodingOptions, generate  # noqa: PLC0415

    c = model.config
    sources, new = _greedy_sources(np.random.default_rng(2), c)
    expected = model.generate(sources, max_new_tokens=new)
    options = DecodingOptions(max_new_tokens=new, stop_ids=(c.eos_id,), suppress_ids=c.suppressed_ids)
    got = translate_ids(sessions, sources, options, c.pad_id, c.bos_id, c.max_length, generate)
    for row, (want, hyps) in enumerate(zip(expected, got)):
        if hyps[0].tokens != want:
            raise ValidationError(f"validation: greedy translation of source {row}: {hyps[0].tokens} on ONNX "
                                  f"Runtime, {want} in Keras")
    return {"sources": len(sources), "max_new_tokens": new, "identical": True}


def _greedy_sources(rng, config) -> tuple[list[list[int]], int]:
    """Random sources of 3, 9 and 6 tokens (at most max_length) and how many tokens to translate
    them to (GREEDY_NEW_TOKENS; BOS and the new tokens within max_length)."""
    c = config
    sources = [rng.integers(min(6, c.vocab_size - 1), c.vocab_size, size=min(n, c.max_length)).tolist()
               for n in (3, 9, 6)]
    return sources, min(GREEDY_NEW_TOKENS, c.max_length - 1)


def translate_ids(sessions, sources, options, pad_id: int, bos_id: int, max_length: int, generate,
                  choice_on_host: bool = False):
    """Run generate.py's loops over one batch of source id lists (right-padded for the encoder);
    `choice_on_host`: greedy picks from the logits even where the graph has `next_token`."""
    from kerasllm.export.generate import right_pad  # noqa: PLC0415

    step = Seq2SeqStep(sessions, *right_pad(sources, pad_id))
    if choice_on_host:
        from kerasllm.export.generate import ChoiceOnHost  # noqa: PLC0415

        step = ChoiceOnHost(step)
    return generate(step, [[bos_id]] * len(sources), options, pad_id=pad_id, max_length=max_length)


def export_seq2seq_family(model, scratch: Path, staging: Path, options, log: Callable) -> dict:
    """`FAMILY_EXPORTERS["seq2seq"]` (see exporter.py): convert, optimize, validate both graphs."""
    c = model.config
    graphs, reports, raws = {}, {}, {}
    # The decoder's self-attention keeps the growing cache for heads GroupQueryAttention cannot run.
    buffer_problem = (group_query_attention_problem(c.head_dim, c.position == "rotary")
                      if options.optimize and options.shared_kv_buffer else None)
    if buffer_problem:
        log(f"decoder: keeping the growing KV cache: {buffer_problem}")

    def optimize(spec, fuse_attention: bool) -> None:
        import onnx  # noqa: PLC0415

        from kerasllm.export.attention_fusion import fuse_encoder_attention, fused_attention_ops  # noqa: PLC0415

        proto = onnx.load(str(raws[spec.name]))
        # The encoder's self-attention -> one Attention node per layer (as the encoder family's);
        # the decoder's self- and cross-attention -> MultiHeadAttention nodes (optimize.py).
        encoder_fused = (fuse_encoder_attention(proto, c.num_heads, c.head_dim, rotary_rows=c.max_length)
                         if fuse_attention and spec.name == "encoder" else 0)
        made = fused_attention_ops(proto) if encoder_fused else {}
        keep = tuple(n for n in spec.outputs if n == "logits" or n == "last_hidden_state")
        fp32 = options.dtype == "fp32"
        reports[spec.name] = optimize_graph(
            proto, staging / spec.file, model_type="bert", num_heads=c.num_heads, hidden_size=c.hidden_dim,
            fuse=options.optimize, dtype=options.dtype, keep_float32_io=keep,
            cached_attention=fuse_attention and spec.name == "decoder",
            rotary_positions=self_attention_slots_bound(c.max_length),
            # Symbolic shape inference only guards SkipLayerNormalization, left out in fp32.
            shape_inference=not fp32, disabled_fusions=cpu_slower_fusions(options.dtype),
            next_token=not fp32 and spec.name == "decoder", suppressed_ids=c.suppressed_ids,
        )
        if encoder_fused:
            reports[spec.name]["fusions"] = {**made, **reports[spec.name]["fusions"]}
            # The token-wise layers between the attention nodes then run on the real tokens only.
            encoder = onnx.load(str(staging / spec.file))
            if pack_padded_tokens(encoder):
                save_onnx(encoder, staging / spec.file)
                reports[spec.name]["padding_free"] = True
                log("encoder: token-wise layers run on the real tokens only (padding removed)")
        if fuse_attention and spec.name == "decoder" and options.shared_kv_buffer and not buffer_problem:
            decoder = onnx.load(str(staging / spec.file))
            if share_self_attention_buffer(decoder, c.num_heads):
                save_onnx(decoder, staging / spec.file)
                report = reports[spec.name]
                fusions = report["fusions"]
                fusions["MultiHeadAttention"] = fusions.get("MultiHeadAttention", 0) - c.decoder_layers
                fusions["GroupQueryAttention"] = c.decoder_layers
                fusions.pop("RotaryEmbedding", None)  # rotary layers: the rotation now runs inside GQA
                report.update(kv_cache=SHARED_BUFFER, nodes_after=len(decoder.graph.node))
        fusions = ", ".join(f"{op} x{n}" for op, n in reports[spec.name]["fusions"].items()) or "none"
        log(f"optimized the {spec.name} ({options.dtype}): fusions {fusions}")

    fuse_attention = options.optimize
    specs = seq2seq_graphs(model)
    for spec in specs:
        start = time.perf_counter()
        raws[spec.name] = scratch / f"raw-{spec.file}"
        save_onnx(trace_to_onnx(spec, model, opset=options.opset), raws[spec.name])
        log(f"converted the {spec.name} to ONNX (opset {options.opset}) in {time.perf_counter() - start:.1f} s")
        if options.dtype == "fp16":  # cross and self-attention caches travel in fp16
            for name, decl in {**spec.inputs, **spec.outputs}.items():
                if name.startswith(("past_key_values.", "present.")):
                    decl.dtype = "float16"
        graphs[spec.name] = {**spec.to_dict(), "opset": options.opset}

    def build(fuse: bool) -> tuple[dict, dict]:
        for spec in specs:
            optimize(spec, fuse)
        sessions = Seq2SeqSessions.open(staging / "encoder.onnx", staging / "decoder.onnx", options.device)
        return reports, validate_seq2seq(model, sessions, dtype=options.dtype)

    start = time.perf_counter()
    _, figures, reverted = validated_with_fallback(build, fuse_attention, log)
    if reverted:
        for report in reports.values():
            report["attention_fusion_reverted"] = reverted
    if buffer_problem:
        reports["decoder"]["shared_buffer_unsupported"] = buffer_problem
    if reports["decoder"].get("kv_cache") == SHARED_BUFFER:  # the decoder's contract (share_self_attention_buffer)
        decoder = graphs["decoder"]
        decoder["inputs"] = {"input_ids": decoder["inputs"]["input_ids"],
                             SEQLENS_K: {"dtype": "int32", "shape": ["batch"]},
                             TOTAL_SEQUENCE_LENGTH: {"dtype": "int32", "shape": []},
                             **{k: v for k, v in decoder["inputs"].items() if k != "input_ids"}}
        decoder["dynamic_axes"][SEQLENS_K] = {"0": "batch"}
        for name, decl in {**decoder["inputs"], **decoder["outputs"]}.items():
            if ".decoder." in name:
                decl["shape"][2] = "max_sequence"
                decoder["dynamic_axes"][name]["2"] = "max_sequence"
    if reports["decoder"].get(NEXT_TOKEN):  # greedy decoding's choice in the graph (optimize.add_next_token)
        graphs["decoder"]["outputs"][NEXT_TOKEN] = {"dtype": "int64", "shape": ["batch", 1]}
        graphs["decoder"]["dynamic_axes"][NEXT_TOKEN] = {"0": "batch"}
    if "max_abs_diff" in figures:
        worst = max(v for k, v in figures["max_abs_diff"].items() if k.endswith("logits"))
        summary = f"max |logits diff| {worst:.2g}"
    else:
        summary = f"top-1 agreement {min(figures['top1_agreement'].values()):.2%}"
    if "greedy" in figures:
        summary += f", greedy x{figures['greedy']['sources']} identical"
    log(f"validated against Keras in {time.perf_counter() - start:.1f} s: {summary}")
    return {"graphs": graphs, "optimization": reports, "validation": figures}

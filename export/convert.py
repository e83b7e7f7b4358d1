"""Keras model -> ONNX graph(s) with tf2onnx, one small declaration per family.

The generic part (`GraphSpec`, `trace_to_onnx`, `save_onnx`) serves every family;
`causal_lm_graph` declares the decoder family's graph. An encoder or seq2seq export
adds its own declaration (inputs, outputs, a `forward` callable) and reuses the rest.

Why the weights are traced as graph *inputs* and only become ONNX initializers after
conversion: tf2onnx freezes variables into TensorFlow constants, runs grappler and
its own constant folding over them and copies them several times (a keras-hub GPT-2
took 308 s and 22 GB here), and constant folding stores a transposed copy of a tied
embedding next to the original. Traced under a `keras.StatelessScope` that maps each
variable to a placeholder, the TensorFlow graph holds no weights at all; the numpy
values are attached once, at the end, under the variables' own names. `Transpose`
of the tied embedding then stays a node, which ONNX Runtime folds when it loads the
graph (memory, not file).

Three rewrites make the graph friendlier to ONNX Runtime, all checked by validation
like everything else:
* `keras.layers.LayerNormalization` is traced as the textbook decomposition
  (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) that ONNX Runtime fuses
  into one LayerNormalization node; Keras's own form (moments, rsqrt, x * inv + res)
  matches none of its patterns.
* TensorFlow's exact GELU is `0.5 * x * erfc(-x / sqrt(2))`; ONNX has no Erfc. It is
  rewritten to `erf`'s form, `0.5 * x * (1 + erf(x / sqrt(2)))`, which ONNX Runtime
  fuses into Gelu/BiasGelu.
* tf2onnx's negative-index fix-up in front of each embedding `Gather` is dropped
  (ONNX `Gather` handles negative indices itself; see `_plain_gather_indices`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

# ONNX Runtime 1.31 refuses some models saved with onnx 1.23's default IR version.
IR_VERSION = 8
DEFAULT_OPSET = 17
# The opsets a bundle can be exported at: tf2onnx 1.17 converts up to 18, and the graph rewrites
# (export/optimize.py, seq2seq_export.py) slice shapes with Shape's start/end, new in opset 15.
OPSETS = range(15, 19)
# Protobuf cannot serialize a message over 2 GB: bigger graphs keep weights outside.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass
class TensorDecl:
    """One graph input or output: element type and shape with named dynamic axes."""

    dtype: str  # "int64", "float32", "float16"
    shape: list  # ints for fixed axes, names ("batch", "sequence", ...) for dynamic ones

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphSpec:
    """What one exported graph looks like from the outside (Optimum-style declaration).

    Args:
        name: the graph's role in the bundle ("model"; later "encoder", "decoder").
        file: its file name in the bundle.
        inputs, outputs: name -> `TensorDecl`, in graph order.
        forward: `forward(**inputs) -> {output name: tensor}` over TensorFlow tensors.
    """

    name: str
    file: str
    inputs: dict[str, TensorDecl]
    outputs: dict[str, TensorDecl]
    forward: Callable | None = field(default=None, repr=False)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            name: {i: axis for i, axis in enumerate(decl.shape) if isinstance(axis, str)}
            for name, decl in {**self.inputs, **self.outputs}.items()
        }

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "dynamic_axes": {k: {str(i): a for i, a in v.items()} for k, v in self.dynamic_axes().items()},
        }


# -- the decoder family -----------------------------------------------------------------------
def past_names(num_layers: int) -> list[str]:
    """ORT GenAI's names for the cache inputs, in graph order."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def causal_lm_graph(model) -> GraphSpec:
    """The decoder graph: one step of `CausalLM.forward_with_cache` with a growing KV cache.

    Inputs `input_ids [B, T]`, `attention_mask [B, P + T]` (int64, left padding) and
    `past_key_values.{i}.key|value [B, H, P, D]`; outputs `logits [B, T, V]` and
    `present.{i}.key|value [B, H, P + T, D]`. P = 0 is the prompt step.
    """
    import tensorflow as tf  # noqa: PLC0415 - Keras side

    c = model.config
    kv = ["batch", c.num_heads, "past_sequence", c.head_dim]
    present_kv = ["batch", c.num_heads, "total_sequence", c.head_dim]
    inputs = {
        "input_ids": TensorDecl("int64", ["batch", "sequence"]),
        "attention_mask": TensorDecl("int64", ["batch", "total_sequence"]),
        **{name: TensorDecl("float32", kv) for name in past_names(c.num_layers)},
    }
    outputs = {
        "logits": TensorDecl("float32", ["batch", "sequence", c.vocab_size]),
        **{name: TensorDecl("float32", present_kv) for name in present_names(c.num_layers)},
    }

    def forward(input_ids, attention_mask, **past):
        keys = [past[f"past_key_values.{i}.key"] for i in range(c.num_layers)]
        values = [past[f"past_key_values.{i}.value"] for i in range(c.num_layers)]
        logits, keys, values = model.forward_with_cache(tf.cast(input_ids, "int32"), attention_mask, keys, values)
        result = {"logits": logits}
        for i, (key, value) in enumerate(zip(keys, values)):
            result[f"present.{i}.key"] = key
            result[f"present.{i}.value"] = value
        return result

    return GraphSpec("model", "model.onnx", inputs, outputs, forward)


# -- tracing and conversion (every family) ----------------------------------------------------
def _plain_layer_norm(layer):
    """LayerNormalization as the decomposition ONNX Runtime fuses (see module docstring)."""
    import tensorflow as tf  # noqa: PLC0415

    def call(inputs):
        x = tf.cast(inputs, "float32")
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        centered = x - mean
        variance = tf.reduce_mean(tf.pow(centered, 2.0), axis=-1, keepdims=True)
        y = centered / tf.sqrt(variance + layer.epsilon)
        if layer.scale:
            y = y * tf.cast(layer.gamma, "float32")
        if layer.center:
            y = y + tf.cast(layer.beta, "float32")
        return tf.cast(y, layer.compute_dtype)

    return call


@contextlib.contextmanager
def _export_friendly_layers(model):
    """Temporarily trace last-axis LayerNormalization layers as `_plain_layer_norm`."""
    import keras  # noqa: PLC0415

    patched = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not isinstance(layer, keras.layers.LayerNormalization) or layer.rms_scaling:
            continue
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if list(axes) in ([-1], [2]):  # the last axis of [B, T, C]
            layer.call = _plain_layer_norm(layer)
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.call


@contextlib.contextmanager
def _without_global_pool_optimizer():
    """tf2onnx turns last-axis ReduceMean into Transpose + GlobalAveragePool, which hides
    LayerNorm from ONNX Runtime's fusions (seen on keras-hub graphs too); skip that pass."""
    from tf2onnx import optimizer  # noqa: PLC0415

    removed = optimizer._optimizers.pop("global_pool_optimizer", None)
    try:
        yield
    finally:
        if removed is not None:
            optimizer._optimizers["global_pool_optimizer"] = removed


@contextlib.contextmanager
def _reshape_merges_keep_copied_dims():
    """tf2onnx merges `Reshape(Reshape(x, s1), s2)` into `Reshape(x, s2)` (its back-to-back
    optimizer), also where `s2` holds zeros, ONNX's "copy this dim from the input": merged, they
    copy x's dims instead of the intermediate's. Its reshape optimizer writes such zeros for every
    dim read from the input's shape, so the merge broke three graphs: one-head attention (the
    context's head Transpose, a Reshape for a size-1 axis, merged with the head merge [0, 0, C]:
    [B, 1, T, D] -> [B, 1, C]), and bias-free projections (a Dense's [B*T, N] tensordot output
    merged with the head split [0, 0, k, H, D]). The merge is kept only where every zero of `s2`
    copies a dim that `s1` copied from x too."""
    from tf2onnx.optimizer import back_to_back_optimizer  # noqa: PLC0415

    handlers = back_to_back_optimizer._func_map
    merge = handlers[("Reshape",)]

    def merge_if_same(g, node, consumer_nodes):
        shapes = [n.inputs[1] if len(n.input) > 1 else None for n in (node, *consumer_nodes[:1])]
        if len(shapes) == 2 and shapes[1] is not None and shapes[1].is_const():
            first = shapes[0].get_tensor_value() if shapes[0] is not None and shapes[0].is_const() else []
            copied = [i for i, dim in enumerate(shapes[1].get_tensor_value()) if dim == 0]
            if any(i >= len(first) or first[i] != 0 for i in copied):
                return []
        return merge(g, node, consumer_nodes)

    handlers[("Reshape",)] = merge_if_same
    try:
        yield
    finally:
        handlers[("Reshape",)] = merge


@contextlib.contextmanager
def _quiet_tf2onnx():
    """tf2onnx logs every op it meets at INFO, and "Erfc is not supported" (rewritten below)."""
    import logging  # noqa: PLC0415

    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def trace_to_onnx(spec: GraphSpec, model, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Convert `spec.forward` over `model`'s weights to an ONNX model (weights as initializers).

    Every axis named in `spec` is dynamic (`None` in the TensorFlow signature), so the
    graph serves any batch size and sequence length.
    """
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415

    variables = [v for v in model.variables if "float" in str(v.dtype)]
    weight_names = [f"kerasllm_weight_{i}" for i in range(len(variables))]
    signature = [
        tf.TensorSpec([None if isinstance(a, str) else a for a in decl.shape], decl.dtype, name=name)
        for name, decl in spec.inputs.items()
    ] + [tf.TensorSpec(v.shape, v.dtype, name=name) for v, name in zip(variables, weight_names)]
    input_names = list(spec.inputs)

    @tf.function(input_signature=signature, autograph=False)
    def function(*args):
        named = dict(zip(input_names, args[:len(input_names)]))
        weights = args[len(input_names):]
        with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
            outputs = spec.forward(**named)
        missing = set(spec.outputs) - set(outputs)
        if missing:
            raise ValueError(f"forward() did not return {sorted(missing)}")
        return {name: outputs[name] for name in spec.outputs}

    with (_export_friendly_layers(model), _without_global_pool_optimizer(), _reshape_merges_keep_copied_dims(),
          _quiet_tf2onnx()):
        proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    # Rewrite while the weights are still graph inputs: protobuf keeps removed or copied
    # messages' memory until the whole model is freed, so big tensors join last.
    _rewrite_erfc(proto)
    _fold_tensordot(proto)
    _plain_gather_indices(proto)
    _drop_mask_broadcast(proto)
    _attach_weights(proto, variables, weight_names)
    proto.ir_version = IR_VERSION
    proto.producer_name = "kerasllm"
    _check_io(proto, spec)
    return proto


def _attach_weights(proto: onnx.ModelProto, variables, placeholder_names) -> None:
    """Turn the weight placeholders into initializers named after the Keras variables."""
    rename = {}
    for variable, placeholder in zip(variables, placeholder_names):
        rename[placeholder] = variable.path
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(variable.numpy()), variable.path))
    kept = [i for i in proto.graph.input if i.name not in rename]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]


def _constant_value(proto, name, producers):
    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def graph_index(graph) -> tuple[dict, dict]:
    """`(producers, consumers)`: tensor name -> the node writing it, and -> the nodes reading it."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producers, consumers


def typed_producer(producers: dict, name: str, op_type: str):
    """The node writing tensor `name` if it is an `op_type` node, else None (for pattern matching)."""
    node = producers.get(name)
    return node if node is not None and node.op_type == op_type else None


def graph_inputs_read(graph, producers: dict, name: str) -> set[str]:
    """The graph inputs whose values tensor `name` depends on (a Shape reads no values)."""
    graph_inputs = {i.name for i in graph.input}
    seen, stack, found = set(), [name], set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in graph_inputs:
            found.add(tensor)
        node = producers.get(tensor)
        if node is not None and node.op_type != "Shape":
            stack.extend(x for x in node.input if x)
    return found


def replace_nodes(proto: onnx.ModelProto, replacements: dict) -> None:
    """Put `replacements[id(node)]` (a list of nodes; empty removes) where each replaced node
    was, keeping graph order; drop what became dead; declare the `com.microsoft` opset the
    fused contrib ops live in."""
    graph = proto.graph
    nodes = []
    for node in graph.node:
        nodes.extend(replacements.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_dead_nodes(proto)
    if any(n.domain == "com.microsoft" for n in graph.node) and not any(
            o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _rewrite_erfc(proto: onnx.ModelProto) -> None:
    """Replace TensorFlow's `erfc(-x / sqrt 2)` by `1 + erf(x / sqrt 2)` (see module docstring)."""
    graph = proto.graph
    producers, _ = graph_index(graph)
    nodes = []
    for node in graph.node:
        if node.op_type != "Erfc":
            nodes.append(node)
            continue
        # Look for z = Mul(Neg(x), 1/sqrt 2) (either operand order) to recover x.
        source = None
        mul = producers.get(node.input[0])
        if mul is not None and mul.op_type == "Mul":
            for a, b in ((0, 1), (1, 0)):
                neg = producers.get(mul.input[a])
                value = _constant_value(proto, mul.input[b], producers)
                if (neg is not None and neg.op_type == "Neg" and value is not None and value.size == 1
                        and abs(float(value.reshape(())) - 1 / math.sqrt(2)) < 1e-6):
                    source = neg.input[0]
        base = node.name or node.output[0]
        one = f"{base}/one"
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        if source is not None:
            sqrt2 = f"{base}/sqrt2"
            graph.initializer.append(numpy_helper.from_array(np.array(math.sqrt(2), np.float32), sqrt2))
            nodes.append(helper.make_node("Div", [source, sqrt2], [f"{base}/scaled"], name=f"{base}/Div"))
        else:
            nodes.append(helper.make_node("Neg", [node.input[0]], [f"{base}/scaled"], name=f"{base}/Neg"))
        nodes.append(helper.make_node("Erf", [f"{base}/scaled"], [f"{base}/erf"], name=f"{base}/Erf"))
        nodes.append(helper.make_node("Add", [f"{base}/erf", one], [node.output[0]], name=f"{base}/Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    # The Neg/Mul feeding a rewritten Erfc may now be dead.
    _remove_dead_nodes(proto)


def _fold_tensordot(proto: onnx.ModelProto) -> None:
    """`Reshape -> MatMul -> Reshape` (TensorFlow's tensordot for a Dense on `[B, T, C]`) -> one MatMul.

    ONNX MatMul broadcasts `[B, T, C] x [C, N]` itself; the reshapes hide the
    MatMul -> Add(bias) pairs that ONNX Runtime fuses (BiasGelu, SkipLayerNorm with bias).
    Only nodes that tf2onnx named after a Tensordot are touched.
    """
    graph = proto.graph
    producers, consumers = graph_index(graph)
    replace = {}  # id(node) -> replacement node, or None to drop
    for node in graph.node:
        if node.op_type != "MatMul" or "Tensordot" not in node.name:
            continue
        before = producers.get(node.input[0])
        after = consumers.get(node.output[0], [])
        if before is None or before.op_type != "Reshape" or len(after) != 1 or after[0].op_type != "Reshape":
            continue
        if len(consumers.get(before.output[0], [])) != 1:
            continue
        if after[0].name != node.name.rsplit("/", 1)[0]:
            continue  # not the tensordot's own Reshape
        replace[id(node)] = helper.make_node("MatMul", [before.input[0], node.input[1]], [after[0].output[0]],
                                             name=node.name)
        replace[id(after[0])] = None
    nodes = [replace.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)
    _remove_dead_nodes(proto)


def _plain_gather_indices(proto: onnx.ModelProto) -> None:
    """Drop tf2onnx's negative-index fix-up in front of embedding lookups.

    `tf.gather` (Keras `take`, `Embedding`) is converted as `Gather(table, where(i < 0,
    i + n, i))`, spelled out as eight small nodes (Cast, Less, Not, Cast, Mul, Cast, Mul,
    Add) per lookup. ONNX `Gather` already reads a negative index as `i + n`, so the
    lookup gets `i` itself: the same result, and per decode step sixteen fewer kernels
    for ONNX Runtime to launch (a step of a small model is mostly launch overhead).
    Matched only in that exact form:

        Add(Mul(Cast(Less(i', 0)), Add(i, n)), Mul(i, Cast(Not(Less(i', 0)))))   i' = i or Cast(i)
    """
    graph = proto.graph
    producers, _ = graph_index(graph)
    node = functools.partial(typed_producer, producers)

    def is_zero(name):
        value = _constant_value(proto, name, producers)
        return value is not None and value.size == 1 and float(value.ravel()[0]) == 0.0

    def negative_test(name, index):
        """`name` is Less(index or Cast(index), 0)."""
        less = node(name, "Less")
        if not less or not is_zero(less.input[1]):
            return None
        source = less.input[0]
        cast = node(source, "Cast")
        return less if source == index or (cast and cast.input[0] == index) else None

    def fixed_index(name):
        add = node(name, "Add")
        muls = add and [node(x, "Mul") for x in add.input]
        if not add or not all(muls):
            return None
        for neg_mul, pos_mul in (muls, muls[::-1]):
            for index in pos_mul.input:  # Mul(i, Cast(Not(L))), either operand order
                other = pos_mul.input[1] if pos_mul.input[0] == index else pos_mul.input[0]
                cast_not = node(other, "Cast")
                not_ = cast_not and node(cast_not.input[0], "Not")
                less = not_ and negative_test(not_.input[0], index)
                if not less:
                    continue
                # Mul(Cast(L), Add(i, n)), either operand order
                for a, b in ((0, 1), (1, 0)):
                    cast_l = node(neg_mul.input[a], "Cast")
                    shifted = node(neg_mul.input[b], "Add")
                    if (cast_l and cast_l.input[0] == less.output[0] and shifted
                            and index in shifted.input):
                        return index
        return None

    changed = False
    for gather in graph.node:
        if gather.op_type == "Gather" and len(gather.input) == 2:
            index = fixed_index(gather.input[1])
            if index is not None:
                gather.input[1] = index
                changed = True
    if changed:
        _remove_dead_nodes(proto)


def _drop_mask_broadcast(proto: onnx.ModelProto) -> None:
    """`Add(x, Expand(b, shape of x))` -> `Add(x, b)`: ONNX's Add broadcasts by itself.

    The Keras attention broadcasts its additive mask to the scores' shape on purpose
    (`kerasllm.layers.attention`: TensorFlow's oneDNN rewrite is slow otherwise); in ONNX the
    Expand is one more kernel and hides the mask from the attention fusions. Matched only
    when the target shape is computed from constants and `Shape(x)` alone.
    """
    graph = proto.graph
    producers, consumers = graph_index(graph)
    constants = {init.name for init in graph.initializer}

    def shape_of(name: str, x: str) -> bool:
        stack, seen = [name], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            node = producers.get(tensor)
            if node is None:
                if tensor not in constants:
                    return False
            elif node.op_type == "Shape":
                if node.input[0] != x:
                    return False
            elif node.op_type != "Constant":
                stack.extend(i for i in node.input if i)
        return True

    changed = False
    for add in graph.node:
        if add.op_type != "Add":
            continue
        for i in (0, 1):
            expand = typed_producer(producers, add.input[i], "Expand")
            if (expand and len(consumers.get(expand.output[0], [])) == 1
                    and shape_of(expand.input[1], add.input[1 - i])):
                add.input[i] = expand.input[0]
                changed = True
    if changed:
        _remove_dead_nodes(proto)


def _remove_dead_nodes(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in needed:
            del graph.initializer[i]


def _check_io(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Put the outputs in declaration order (TensorFlow returns dict outputs sorted by key:
    "present.10" before "present.2") and check the names."""
    by_name = {o.name: o for o in proto.graph.output}
    if set(by_name) == set(spec.outputs):
        ordered = [by_name[name] for name in spec.outputs]
        del proto.graph.output[:]
        proto.graph.output.extend(ordered)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != list(spec.inputs) or outputs != list(spec.outputs):
        raise RuntimeError(f"exported graph I/O {inputs} -> {outputs} differs from the declaration "
                           f"{list(spec.inputs)} -> {list(spec.outputs)}")


def weights_nbytes(proto: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(i).nbytes if not i.raw_data else len(i.raw_data)
               for i in proto.graph.initializer)


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> list[Path]:
    """Save with IR version `IR_VERSION`; graphs over ~2 GB keep weights in `<file>.data`.

    Returns the files written (the graph, and the external data file if any).
    """
    path = Path(path)
    proto.ir_version = IR_VERSION
    if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


def export_causal_lm(model, path: str | Path, opset: int = DEFAULT_OPSET) -> tuple[GraphSpec, list[Path]]:
    """Trace `model` (a `CausalLM`) and save its graph at `path`."""
    spec = causal_lm_graph(model)
    proto = trace_to_onnx(spec, model, opset=opset)
    return spec, save_onnx(proto, path)

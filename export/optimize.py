"""Graph optimization: ONNX Runtime's transformer fusions and fp16 conversion.

Two layers of optimization, both ONNX Runtime's own:
* offline, here: `onnxruntime.transformers.optimizer` fuses LayerNormalization,
  SkipLayerNormalization, (Bias)Gelu and, where its patterns match, attention. The
  saved graph stays portable (no provider-specific kernels); the fusions that happened
  are counted and recorded in the bundle's manifest.
* at load time: every session runs ONNX Runtime's graph optimizations at
  `ORT_ENABLE_ALL` (constant folding, e.g. of the tied embedding's transpose, and
  provider-specific fusions; see runtime.py).

fp16 uses `onnxruntime.transformers.float16` with LayerNorm and softmax kept in float32
(`op_block_list`), integer inputs and the logits kept in their original types
(`keep_io_types`) and the KV cache in fp16. The converter can give two Cast nodes the
same name on tf2onnx graphs, which ONNX Runtime refuses; names are made unique after.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx

from kerasllm.export.convert import IR_VERSION, save_onnx

# Ops kept in float32 in fp16 graphs: normalization statistics and softmax overflow in fp16.
FP16_BLOCKED_OPS = ["LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "ReduceMean", "Pow",
                    "Sqrt", "Erf", "CumSum"]
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


def optimize_graph(source: str | Path | onnx.ModelProto, target: str | Path, *, model_type: str, num_heads: int,
                   hidden_size: int, fuse: bool = True, dtype: str = "fp32",
                   keep_float32_io: tuple[str, ...] = ("logits",), shape_inference: bool = True,
                   disabled_fusions: tuple[str, ...] = ()) -> dict:
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
    Returns what was done: `{"fusions": {op: count}, "dtype", "nodes_before", "nodes_after", ...}`.
    """
    from onnxruntime.transformers import optimizer  # noqa: PLC0415 - slow import, export time only
    from onnxruntime.transformers.fusion_options import FusionOptions  # noqa: PLC0415
    from onnxruntime.transformers.onnx_model import OnnxModel  # noqa: PLC0415

    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be fp32 or fp16, got {dtype!r}")
    original = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source))
    before = _op_counts(original)
    # Without shape inference nothing copies the model: the weights can stay.
    stash = _set_aside_weights(original) if fuse and shape_inference else {}
    if fuse:
        options = FusionOptions(model_type)
        options.enable_shape_inference = shape_inference
        for name in disabled_fusions:
            setattr(options, f"enable_{name}", False)
        # The optimizer's modules log each fusion at INFO and warn that the producer is not
        # PyTorch, under top-level logger names; the caller reports the fusions instead.
        logging.disable(logging.WARNING)
        try:
            model = optimizer.optimize_model(
                original, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
                optimization_options=options, only_onnxruntime=False,
            )
        finally:
            logging.disable(logging.NOTSET)
    else:
        model = OnnxModel(original)
    _restore_weights(model.model, stash)
    del stash
    after_fusion = _op_counts(model.model)
    fused = {op: after_fusion[op] - before[op] for op in FUSED_OPS if after_fusion[op] > before[op]}
    report = {"transformer_fusions": fuse, "model_type": model_type, "fusions": fused,
              "disabled_fusions": list(disabled_fusions),
              "nodes_before": sum(before.values()), "dtype": dtype,
              "session_graph_optimization_level": "ORT_ENABLE_ALL"}
    if dtype == "fp16":
        model.convert_float_to_float16(keep_io_types=list(keep_float32_io), op_block_list=FP16_BLOCKED_OPS)
        report["fp16_blocked_ops"] = FP16_BLOCKED_OPS
        report["renamed_nodes"] = dedupe_node_names(model.model)
    proto = model.model
    proto.ir_version = IR_VERSION
    report["nodes_after"] = len(proto.graph.node)
    save_onnx(proto, target)
    return report

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


def optimize_graph(source: str | Path, target: str | Path, *, model_type: str, num_heads: int, hidden_size: int,
                   fuse: bool = True, dtype: str = "fp32", keep_float32_io: tuple[str, ...] = ("logits",)) -> dict:
    """Fuse (optional) and convert (fp16 optional) the graph at `source`, save it at `target`.

    Args:
        model_type: the transformer optimizer's model type ("gpt2" for decoders, "bert" for encoders).
        num_heads, hidden_size: the model's shape (the attention fusion needs them).
        fuse: run the transformer fusions.
        dtype: "fp32" or "fp16".
        keep_float32_io: float graph inputs/outputs that stay float32 in fp16 graphs.
    Returns what was done: `{"fusions": {op: count}, "dtype", "nodes_before", "nodes_after", ...}`.
    """
    from onnxruntime.transformers import optimizer  # noqa: PLC0415 - slow import, export time only
    from onnxruntime.transformers.fusion_options import FusionOptions  # noqa: PLC0415

    source, target = Path(source), Path(target)
    # The optimizer logs each fusion at INFO and warns that the producer is not PyTorch;
    # the fusions are reported by the caller instead.
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    original = onnx.load(str(source))
    before = _op_counts(original)
    options = FusionOptions(model_type)
    model = optimizer.optimize_model(
        str(source), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
        optimization_options=options, only_onnxruntime=False,
    ) if fuse else None
    if model is None:
        from onnxruntime.transformers.onnx_model import OnnxModel  # noqa: PLC0415

        model = OnnxModel(original)
    fused = Counter()
    after_fusion = _op_counts(model.model)
    for op in FUSED_OPS:
        if after_fusion[op] > before[op]:
            fused[op] = after_fusion[op] - before[op]
    report = {"transformer_fusions": fuse, "model_type": model_type, "fusions": dict(fused),
              "nodes_before": sum(before.values()), "dtype": dtype,
              "session_graph_optimization_level": "ORT_ENABLE_ALL"}
    if dtype == "fp16":
        model.convert_float_to_float16(keep_io_types=list(keep_float32_io), op_block_list=FP16_BLOCKED_OPS)
        report["fp16_blocked_ops"] = FP16_BLOCKED_OPS
        report["renamed_nodes"] = dedupe_node_names(model.model)
    elif dtype != "fp32":
        raise ValueError(f"dtype must be fp32 or fp16, got {dtype!r}")
    proto = model.model
    proto.ir_version = IR_VERSION
    report["nodes_after"] = len(proto.graph.node)
    save_onnx(proto, target)
    return report

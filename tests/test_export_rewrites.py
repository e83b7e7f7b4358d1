"""The ONNX graph rewrites of export/convert.py keep what the graph computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from kerasllm.export.convert import _drop_mask_broadcast


def _graph(shape_source: str) -> onnx.ModelProto:
    """y = x + Expand(b, Shape(<shape_source>)), x [B, H, T, S], b [1, 1, T, S]."""
    nodes = [helper.make_node("Shape", [shape_source], ["shape"]),
             helper.make_node("Expand", ["b", "shape"], ["b_full"]),
             helper.make_node("Add", ["x", "b_full"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2, 3, 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 1, 3, 3])]
        + ([helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 2, 3, 3])] if shape_source == "z" else []),
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0]


def test_mask_broadcast_to_the_scores_shape_is_dropped_with_the_same_result():
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(4, 2, 3, 3)).astype("float32"),
             "b": rng.normal(size=(1, 1, 3, 3)).astype("float32")}
    model = _graph("x")
    expected = _run(model, feeds)
    _drop_mask_broadcast(model)
    assert [n.op_type for n in model.graph.node] == ["Add"]
    np.testing.assert_array_equal(_run(model, feeds), expected)


def test_a_broadcast_to_another_tensors_shape_is_kept():
    model = _graph("z")  # Expand to z's shape can change the result's shape: not the pattern
    _drop_mask_broadcast(model)
    assert [n.op_type for n in model.graph.node] == ["Shape", "Expand", "Add"]

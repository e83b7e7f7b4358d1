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


def _encoder_graph(extra_op: str | None = None) -> onnx.ModelProto:
    """EmbedLayerNormalization -> Attention -> token-wise layers -> Attention -> norm, as the
    seq2seq encoder's optimized graph is (pre-LN, fused attention); `extra_op` puts a
    non-token-wise node into the region between the attention nodes."""
    rng = np.random.default_rng(0)
    hidden, vocab, positions = 8, 11, 16

    def weight(name, *shape):
        return onnx.numpy_helper.from_array(rng.normal(size=shape).astype("float32"), name)

    initializers = [weight("word", vocab, hidden), weight("pos", positions, hidden), weight("gamma", hidden),
                    weight("beta", hidden), weight("qkv0", hidden, 3 * hidden), weight("qkv0_b", 3 * hidden),
                    weight("out0", hidden, hidden), weight("out0_b", hidden), weight("ff1", hidden, 2 * hidden),
                    weight("ff1_b", 2 * hidden), weight("ff2", 2 * hidden, hidden),
                    weight("qkv1", hidden, 3 * hidden), weight("qkv1_b", 3 * hidden)]
    ms = "com.microsoft"
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Cast", ["attention_mask"], ["mask32"], to=TensorProto.INT32),
        helper.make_node("EmbedLayerNormalization", ["ids32", "", "word", "pos", "", "gamma", "beta", "mask32"],
                         ["embedded", "mask_index", "embedding_sum"], domain=ms),
        helper.make_node("Attention", ["embedded", "qkv0", "qkv0_b", "mask_index"], ["attn0"], domain=ms, num_heads=2),
        helper.make_node("MatMul", ["attn0", "out0"], ["proj0"]),
        helper.make_node("Add", ["proj0", "out0_b"], ["proj0_b"]),
        helper.make_node("Add", ["embedding_sum", "proj0_b"], ["res0"]),
        helper.make_node("LayerNormalization", ["res0", "gamma", "beta"], ["norm0"], axis=-1),
        helper.make_node("MatMul", ["norm0", "ff1"], ["inner"]),
        helper.make_node("BiasGelu", ["inner", "ff1_b"], ["act"], domain=ms),
        helper.make_node("MatMul", ["act", "ff2"], ["ff_out"]),
        helper.make_node("Add", ["res0", "ff_out"], ["res1"]),
        helper.make_node("LayerNormalization", ["res1", "gamma", "beta"], ["norm1"], axis=-1),
        helper.make_node("Attention", ["norm1", "qkv1", "qkv1_b", "mask_index"], ["attn1"], domain=ms, num_heads=2),
        helper.make_node("Add", ["res1", "attn1"], ["res2"]),
        helper.make_node("LayerNormalization", ["res2", "gamma", "beta"], ["last_hidden_state"], axis=-1),
    ]
    if extra_op:  # e.g. a Softmax over the rows' features: per row, but not in the list the rewrite trusts
        nodes[11] = helper.make_node("Add", ["res0", "ff_soft"], ["res1"])
        nodes.insert(11, helper.make_node(extra_op, ["ff_out"], ["ff_soft"]))
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["B", "S", hidden])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])
    model.ir_version = 8
    return model


def test_padding_free_encoder_gives_the_same_real_tokens_and_finite_padding():
    from kerasllm.export.token_packing import pack_padded_tokens

    lengths = np.array([7, 3, 5, 1])
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(1, 11, (4, 7)).astype("int64"),
             "attention_mask": (np.arange(7)[None] < lengths[:, None]).astype("int64")}
    model = _encoder_graph()
    expected = _run(model, feeds)
    assert pack_padded_tokens(model) == 3  # the two attention outputs and the embedding sum
    got = _run(model, feeds)
    real = feeds["attention_mask"].astype(bool)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got[real], expected[real], rtol=0, atol=1e-6)
    assert np.isfinite(got).all()
    # The token-wise layers now see the 16 real tokens, not 4 x 7 positions.
    model.graph.output.append(helper.make_tensor_value_info("norm0", TensorProto.FLOAT, None))
    rows = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["norm0"], feeds)[0]
    assert rows.shape == (lengths.sum(), 8)


def test_padding_free_rewrite_leaves_a_graph_with_other_ops_alone():
    from kerasllm.export.token_packing import pack_padded_tokens

    model = _encoder_graph(extra_op="Softmax")
    before = model.SerializeToString()
    assert pack_padded_tokens(model) == 0
    assert model.SerializeToString() == before

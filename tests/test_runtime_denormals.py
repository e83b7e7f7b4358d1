"""ONNX Runtime's CPU kernels run on the calling thread with denormals flushed (runtime.flush_denormals),
and opening a session leaves the caller's floating-point environment as it was."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kerasllm.export import runtime

pytestmark = pytest.mark.skipif(runtime._LIBM is None, reason="flush_denormals acts on x86-64 Linux only")

TINY, SCALE = np.float32(1e-38), np.float32(0.01)  # their product, 1e-40, is a denormal


def _scale_model(path) -> None:
    """y = x * 0.01"""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [float(SCALE)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_flush_denormals_flushes_on_this_thread_numpy_and_onnx_runtime_and_restores(tmp_path):
    _scale_model(tmp_path / "scale.onnx")
    session = runtime.create_session(tmp_path / "scale.onnx", "cpu", threads=1).session
    x = np.full(64, TINY, np.float32)
    assert TINY * SCALE != 0 and session.run(None, {"x": x})[0].min() > 0
    with runtime.flush_denormals():
        assert TINY * SCALE == 0
        assert not session.run(None, {"x": x})[0].any()
    assert TINY * SCALE != 0 and session.run(None, {"x": x})[0].min() > 0  # restored


def test_opening_the_first_session_leaves_the_callers_thread_alone(tmp_path):
    """ORT applies session.set_denormal_as_zero to the thread that opens the process's first session,
    for good (ORT 1.31: a plain `InferenceSession` with that option leaves the thread flushing);
    `create_session` undoes it, in a fresh process where its session is the first."""
    _scale_model(tmp_path / "scale.onnx")
    script = textwrap.dedent(f"""
        import numpy as np
        from kerasllm.export.runtime import create_session
        create_session({str(tmp_path / "scale.onnx")!r}, "cpu")
        print(np.float32(1e-38) * np.float32(0.01) == 0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"

"""Rows of cache tensors selected where they live: beam search's reorder on a GPU. Never imports
TensorFlow (nor `onnx`: the serving-only environment has neither).

Why: a reorder on CUDA used to copy every cache tensor to the host, index it with NumPy and copy
it back, every beam-search step. At GPT-2 small, 8 inputs x 4 beams and 256 slots in fp16 that is
24 tensors of 12.6 MB: the NumPy gather alone took 83 ms on the 2-core development machine, where
a decode step on an H100 takes a few. ONNX Runtime has no Python call that gathers device memory,
so a one-node graph does it (`Gather(x, indices, axis=0)`), run with IO binding into new tensors on
the same device. The graphs ship with the package (`graphs/gather_rows.<dtype>.onnx`, built by
`build_gather_rows`; a test checks the files against it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from kerasllm.export.runtime import kept_in_forked_children

GRAPHS = Path(__file__).with_name("graphs")
# numpy dtype name -> ONNX TensorProto element type
ELEMENT_TYPES = {"float32": 1, "float16": 10}


def graph_path(dtype: str) -> Path:
    return GRAPHS / f"gather_rows.{dtype}.onnx"


def build_gather_rows(dtype: str) -> bytes:
    """The graph `y = Gather(x, indices, axis=0)` for `x` of any shape and `dtype`, serialized (needs
    `onnx`: the export side's dependency, used to write the shipped files)."""
    import onnx  # noqa: PLC0415 - only to (re)build the shipped graphs
    from onnx import helper  # noqa: PLC0415

    element = ELEMENT_TYPES[dtype]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["x", "indices"], ["y"], axis=0, name="gather_rows")], "gather_rows",
        [helper.make_tensor_value_info("x", element, None),
         helper.make_tensor_value_info("indices", onnx.TensorProto.INT64, ["rows"])],
        [helper.make_tensor_value_info("y", element, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="kerasllm")
    model.ir_version = 8  # what every supported ONNX Runtime reads
    return model.SerializeToString()


class RowGather:
    """`rows(values, indices)`: new tensors holding rows `indices` (axis 0) of each `OrtValue`, on the
    device they are on. One small session per dtype, opened at first use."""

    def __init__(self, device_type: str, device_id: int = 0):
        self.device_type, self.device_id = device_type, device_id
        self._sessions: dict[str, ort.InferenceSession] = {}

    def _session(self, dtype: str) -> ort.InferenceSession:
        session = self._sessions.get(dtype)
        if session is None:
            providers = (["CPUExecutionProvider"] if self.device_type == "cpu" else
                         [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"])
            session = self._sessions[dtype] = kept_in_forked_children(
                ort.InferenceSession(str(graph_path(dtype)), providers=providers))
        return session

    def rows(self, values, indices: np.ndarray) -> list:
        indices = np.ascontiguousarray(indices, np.int64)
        out = []
        for value in values:
            dtype = _numpy_dtype(value)
            session = self._session(dtype)
            shape = [len(indices), *value.shape()[1:]]
            result = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype), self.device_type,
                                                               self.device_id)
            binding = session.io_binding()
            binding.bind_ortvalue_input("x", value)
            binding.bind_cpu_input("indices", indices)
            binding.bind_ortvalue_output("y", result)
            session.run_with_iobinding(binding)
            out.append(result)
        return out


_GATHERS: dict[tuple[str, int], RowGather] = {}


def gather_rows(values, indices: np.ndarray, device_type: str, device_id: int = 0) -> list:
    """`RowGather.rows` with one `RowGather` per device for the process (its sessions opened once)."""
    gather = _GATHERS.get((device_type, device_id))
    if gather is None:
        gather = _GATHERS[(device_type, device_id)] = RowGather(device_type, device_id)
    return gather.rows(values, indices)


def _numpy_dtype(value) -> str:
    """An `OrtValue`'s element type as a NumPy dtype name ("float32", "float16")."""
    names = {"tensor(float)": "float32", "tensor(float16)": "float16"}
    return names[value.data_type()]

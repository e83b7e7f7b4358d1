"""Rows of cache tensors gathered where they live (export/row_gather.py): beam search on a GPU.

The CUDA code paths of the runtime (KV buffers as device tensors, reorders gathered on the device)
run here on the CPU with `host_buffers=False`: the same tensors, the same calls, CPU memory."""

import numpy as np
import onnxruntime as ort
import pytest

from kerasllm.export.row_gather import ELEMENT_TYPES, RowGather, build_gather_rows, graph_path


@pytest.mark.parametrize("dtype", sorted(ELEMENT_TYPES))
def test_the_shipped_graphs_are_what_the_builder_makes(dtype):
    assert graph_path(dtype).read_bytes() == build_gather_rows(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_are_gathered_exactly_in_any_order_and_number(dtype):
    rng = np.random.default_rng(0)
    gather = RowGather("cpu")
    tensors = [rng.standard_normal((6, 3, 5, 4)).astype(dtype), rng.standard_normal((6, 2)).astype(dtype)]
    values = [ort.OrtValue.ortvalue_from_numpy(t) for t in tensors]
    for indices in ([5, 0, 0, 2, 3, 3, 1, 4], [2, 1], [0, 1, 2, 3, 4, 5], [4] * 12):
        got = gather.rows(values, np.array(indices))
        for tensor, value in zip(tensors, got):
            assert value.shape() == [len(indices), *tensor.shape[1:]]
            assert np.array_equal(value.numpy(), tensor[indices])

"""ONNX Runtime sessions for bundles: providers, devices, IO binding. Never imports TensorFlow.

* `create_session(path, device)` picks the CUDA execution provider only when a session
  really gets it (onnxruntime-gpu lists CUDA among the available providers even on a
  machine without CUDA, then prints an error block and runs on the CPU), keeps that
  error block off the terminal, and says in one line what runs.
* `DecoderSession` runs a decoder graph with a past/present KV cache through IO binding:
  on CUDA the cache stays on the device as `OrtValue`s from one step to the next, and
  only the logits (what sampling needs) come back to the host. The same code path runs
  on the CPU, so the CPU tests exercise it.

Devices: `None`/"auto" (CUDA when it loads, else CPU), "cpu", "cuda", "cuda:N".
Environment: `KERASLLM_ORT_SPINNING=0` stops idle pool threads from spinning (see `_spinning`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from kerasllm.errors import KerasLLMError, UsageError

log = logging.getLogger("kerasllm")

# ORT's log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_QUIET = 3
_SILENT = 4
ort.set_default_logger_severity(_QUIET)

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32}


def parse_device(device: str | None) -> tuple[str, int]:
    """`None`/"auto" -> ("auto", 0); "cpu"; "cuda" -> ("cuda", 0); "cuda:N" -> ("cuda", N)."""
    if device in (None, "", "auto"):
        return "auto", 0
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise UsageError(f"device must be cpu, cuda or cuda:N, got {device!r}")


@dataclass
class Session:
    """An `InferenceSession` and where it runs (`device_type` "cpu" or "cuda", `device_id`)."""

    session: ort.InferenceSession
    device_type: str
    device_id: int
    description: str

    @property
    def input_types(self) -> dict[str, type]:
        return {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


def _spinning() -> str:
    """ONNX Runtime's pool threads spin while they wait for work unless told not to.

    Spinning is ORT's default and the faster choice on a machine the job has to itself: a
    decode step (small preset, batch 8, quiet 2-core CPU) took 0.53 ms spinning and 0.81 ms
    not, because every small op otherwise waits for its threads to wake. On a CPU shared
    with other busy processes spinning threads steal the cores the work needs (the same
    step: 4.5 ms spinning, 3.4 ms not, under load). `KERASLLM_ORT_SPINNING=0` turns it off.
    """
    value = os.environ.get("KERASLLM_ORT_SPINNING", "1").strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise UsageError(f"KERASLLM_ORT_SPINNING must be 0 or 1, got {value!r}")
    return "1" if value in ("1", "true", "yes", "on") else "0"


def _options(severity: int, threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = severity
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    spinning = _spinning()
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return options


def create_session(path: str | Path, device: str | None = None, threads: int | None = None) -> Session:
    """Open `path` on `device` (see the module docstring); logs one line saying what runs."""
    kind, device_id = parse_device(device)
    path = str(path)
    reason = "CPU requested"
    if kind in ("auto", "cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reason = "this onnxruntime build has no CUDA provider"
        else:
            # Silence the provider's load-failure block; the result is checked below.
            ort.set_default_logger_severity(_SILENT)
            try:
                session = ort.InferenceSession(
                    path, _options(_SILENT, threads),
                    providers=[("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"],
                )
            except Exception as err:  # ORT raises its own exception types
                session, reason = None, f"CUDA session failed ({str(err).splitlines()[0][:200]})"
            finally:
                ort.set_default_logger_severity(_QUIET)
            if session is not None and session.get_providers()[0] == "CUDAExecutionProvider":
                description = f"ONNX Runtime {ort.__version__} on CUDAExecutionProvider (cuda:{device_id})"
                log.info(description)
                return Session(session, "cuda", device_id, description)
            if session is not None:
                reason = "CUDA provider did not load (no CUDA driver or libraries)"
        if kind == "cuda":
            raise KerasLLMError(f"device {device}: {reason}")
    session = ort.InferenceSession(path, _options(_QUIET, threads), providers=["CPUExecutionProvider"])
    description = f"ONNX Runtime {ort.__version__} on CPUExecutionProvider ({reason})"
    log.info(description)
    return Session(session, "cpu", 0, description)


class DecoderSession:
    """A decoder graph with a KV cache (`past_key_values.*` -> `present.*`), run step by step.

    `step(input_ids, attention_mask, cache)` returns `(logits [B, T, V] float32 on the host,
    cache)`; the cache is a list of `OrtValue`s on the session's device (None before the
    first step). `reorder(cache, indices)` selects batch rows (beam search).

    Args:
        session: a `Session` over a graph with the decoder I/O (see export/convert.py).
    """

    def __init__(self, session: Session):
        self.session = session
        inputs = session.session.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        self.present_names = [n for n in session.output_names if n.startswith("present.")]
        if not self.past_names or len(self.past_names) != len(self.present_names):
            raise KerasLLMError("graph has no past_key_values/present inputs and outputs")
        past = next(i for i in inputs if i.name == self.past_names[0])
        self.num_heads, self.head_dim = past.shape[1], past.shape[3]
        self.cache_dtype = session.input_types[self.past_names[0]]
        self.ids_dtype = session.input_types["input_ids"]
        outputs = session.output_names
        self._logits_index = outputs.index("logits")
        self._present_index = [outputs.index(name) for name in self.present_names]

    def empty_cache(self, batch: int) -> list:
        empty = np.zeros((batch, self.num_heads, 0, self.head_dim), self.cache_dtype)
        return [self._to_device(empty) for _ in self.past_names]

    def _to_device(self, array: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(array, self.session.device_type, self.session.device_id)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: Sequence | None = None):
        if cache is None:
            cache = self.empty_cache(input_ids.shape[0])
        binding = self.session.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, self.ids_dtype))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        for name, value in zip(self.past_names, cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.session.device_type, self.session.device_id)
        self.session.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[self._logits_index].numpy()
        present = [outputs[i] for i in self._present_index]
        return logits.astype(np.float32, copy=False), present

    __call__ = step  # a DecoderSession is a step function (see generate.py)

    def reorder(self, cache: Sequence, indices: np.ndarray) -> list:
        """Rows `indices` of every cache tensor. On CUDA this goes through the host (beam search only)."""
        return [self._to_device(np.ascontiguousarray(value.numpy()[indices])) for value in cache]

"""ONNX Runtime sessions for bundles: providers, devices, IO binding. Never imports TensorFlow.

* `create_session(path, device)` picks the CUDA execution provider only when a session
  really gets it (onnxruntime-gpu lists CUDA among the available providers even on a
  machine without CUDA, then prints an error block and runs on the CPU), keeps that
  error block off the terminal, and says in one line what runs.
* `DecoderSession` runs a decoder graph with a past/present KV cache through IO binding:
  on CUDA the cache stays on the device as `OrtValue`s from one step to the next (beam
  search's reorders are gathered there too, row_gather.py), and only the logits (what
  sampling needs) or, for greedy decoding, the chosen token ids come back to the host.
  The same code paths run on the CPU (`host_buffers=False`), so the CPU tests exercise them.
* `flush_denormals()` wraps code that runs sessions on the CPU: ORT's kernels run on the
  calling thread, and masked attention runs up to ~2x slower there with denormals.

Devices: `None`/"auto" (CUDA when it loads, else CPU), "cpu", "cuda", "cuda:N".
Environment: `KERASLLM_ORT_SPINNING=0` stops idle pool threads from spinning (see `_spinning`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import os
import platform
import re
import sys
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kerasllm.errors import BundleError, KerasLLMError, UsageError

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
    raise UsageError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")


# The ONNX Runtime sessions this process opened (`kept_in_forked_children`).
_SESSIONS: "weakref.WeakSet[ort.InferenceSession]" = weakref.WeakSet()


def kept_in_forked_children(session: ort.InferenceSession) -> ort.InferenceSession:
    """Register `session` so that a forked child never frees it (`_keep_inherited_sessions`)."""
    _SESSIONS.add(session)
    return session


def _keep_inherited_sessions() -> None:
    """In a forked child (gunicorn --preload, multiprocessing's fork), leak the sessions it inherited.

    A session's thread pool stays in the parent (fork copies one thread), and ONNX Runtime's
    destructor waits for those threads: a child that still held a predictor loaded before the fork
    hung at its normal interpreter exit (`sys.exit`, returning from main) until killed. The child
    keeps using the sessions; they are never freed, their memory is the parent's copy-on-write pages,
    and the OS reclaims it at exit. Written by hand: ONNX Runtime has no fork hook (its Python API
    cannot release a session without running that destructor)."""
    for session in list(_SESSIONS):
        native = getattr(session, "_sess", None)
        if native is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(native))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_keep_inherited_sessions)


@dataclass
class Session:
    """An `InferenceSession` and where it runs (`device_type` "cpu" or "cuda", `device_id`)."""

    session: ort.InferenceSession
    device_type: str
    device_id: int
    description: str
    cuda_graph: bool = False  # opened with ORT's `enable_cuda_graph` (see `create_session`)
    path: str = ""  # the graph's file, for messages

    def __post_init__(self):
        kept_in_forked_children(self.session)

    @property
    def input_types(self) -> dict[str, type]:
        return {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


# ORT's session-level fusions left out on the CPU. SkipLayerNormFusion turns the last residual Add +
# the final LayerNormalization of a pre-LN stack (the one Add with a single consumer) into
# SkipLayerNormalization, whose fp32 CPU kernel in ORT 1.31 is ~8x slower than the two ops it
# replaces: 421 vs ~50 us for one 16 x 32 x 128 tensor (ORT profile), so a seq2seq encoder batch
# took 10.24 ms with it and 9.99 ms without (median of 40 alternating runs). The transformer
# optimizer's own SkipLayerNormalization fusion is already off for fp32 graphs (optimize.py).
CPU_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


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
        raise UsageError(f"KERASLLM_ORT_SPINNING must be 0 or 1 (also true/false, yes/no, on/off), got {value!r}")
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
    # Flush denormals to zero in ORT's pool threads (see `flush_denormals` for the calling thread).
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


# glibc's and musl's x86-64 fenv_t: 32 bytes, the SSE control/status register (MXCSR) at byte 28.
# The buffers get room to spare; `_load_libm` checks the layout before anything relies on it.
_FENV_BYTES, _MXCSR_OFFSET = 64, 28
_FLUSH_TO_ZERO, _DENORMALS_ARE_ZERO = 0x8000, 0x0040


def _environment(libm):
    """This thread's floating-point environment (a buffer for fesetenv), or None."""
    environment = ctypes.create_string_buffer(_FENV_BYTES)
    return environment if libm.fegetenv(environment) == 0 else None


def _with_flushing(environment, flush: bool):
    """A copy of `environment` with denormal flushing (FTZ and DAZ) on or off."""
    mxcsr = int.from_bytes(environment.raw[_MXCSR_OFFSET:_MXCSR_OFFSET + 4], "little")
    bits = _FLUSH_TO_ZERO | _DENORMALS_ARE_ZERO
    mxcsr = mxcsr | bits if flush else mxcsr & ~bits
    copy = ctypes.create_string_buffer(environment.raw, _FENV_BYTES)
    ctypes.memmove(ctypes.addressof(copy) + _MXCSR_OFFSET, mxcsr.to_bytes(4, "little"), 4)
    return copy


def _load_libm():
    """libm, where its fegetenv/fesetenv turn denormal flushing on and off as `flush_denormals`
    does it (checked on a denormal product), else None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        saved = _environment(libm)
    except (OSError, AttributeError):
        return None
    if saved is None:
        return None
    try:
        libm.fesetenv(_with_flushing(saved, True))
        flushed = np.float32(1e-38) * np.float32(0.01) == 0
        libm.fesetenv(_with_flushing(saved, False))
        kept = np.float32(1e-38) * np.float32(0.01) != 0
    finally:
        libm.fesetenv(saved)
    return libm if flushed and kept else None


_LIBM = _load_libm()


@contextlib.contextmanager
def flush_denormals():
    """Flush denormal floats to zero on this thread while the block runs (ONNX Runtime's CPU
    kernels run on the calling thread), then restore the thread's floating-point environment.

    Why: MLAS's exp never returns an exact 0, so a masked attention score becomes a denormal
    probability, and every multiply by one then takes a slow microcode path. TensorFlow's
    executor flushes denormals on its threads; ORT's `session.set_denormal_as_zero` covers
    its pool threads, but the calling thread only at the process's first session (and then
    for good, whatever the caller runs afterwards). Values below 1.2e-38 are all it changes.
    'small' encoder 64 x 128, a third of the rows padded: 615 -> 682 seq/s; seq2seq 16-row
    batch on one thread: encoder 8.64 -> 8.04 ms, 32 decoder steps 20.8 -> 20.1 ms.
    No library sets the register from Python, hence glibc's fegetenv/fesetenv through ctypes
    (x86-64 Linux; elsewhere this does nothing)."""
    saved = _environment(_LIBM) if _LIBM is not None else None
    if saved is None:
        yield
        return
    _LIBM.fesetenv(_with_flushing(saved, True))
    try:
        yield
    finally:
        _LIBM.fesetenv(saved)


# glibc's mallopt parameters (malloc.h), and the values set: the mmap threshold at its documented
# maximum on 64-bit systems (4 MB * sizeof(long); newer glibc refuses more), the trim threshold at 1 GB.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 32 << 20, 1 << 30


def retain_freed_memory() -> bool:
    """Let this process's heap keep what it frees (glibc), so that large NumPy arrays made anew for
    each batch reuse memory the process already touched. For a serving process (the batch CLI
    calls it once); a library import changes nothing. Returns whether it applied.

    Why: glibc serves allocations above its mmap threshold (128 KB at first, raised adaptively up
    to 32 MB) with fresh `mmap`s and gives freed heap tops back to the system, so the buffers a
    batch allocates (a beam's self-attention buffer, the cross keys/values gathered per beam)
    arrive as untouched pages, and the first write to each page is a page fault. Here arrays up to
    32 MB come from the heap, and the heap is trimmed only past 1 GB free: freed memory stays with
    the process for the next batch (its resident memory stays at its peak instead of falling
    between batches). Measured on one beam-4 batch of 16 (bench_seq2seq's small model, one thread,
    medians of 12, 3 alternated process pairs, 2-core AMD EPYC): 122.5 -> 98.0, 115.5 -> 96.4,
    100.4 -> 87.8 ms; greedy the same (31.8/31.0, 32.0/33.8, 30.6/30.2 ms). `kerasllm translate
    --num-beams 4` over 512 lines, 3 alternated pairs: 2.62/2.35, 2.49/2.46, 2.81/2.37 s, peak
    resident memory the same (176-177 MB). Not glibc (macOS, musl): nothing changes.
    No library sets this from Python, hence `mallopt` through ctypes.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                 _TRIM_THRESHOLD_BYTES))


# What runs, as logged: a job opens several sessions (encoder and decoder, one per worker thread)
# on the same provider, and says so once.
_ANNOUNCED: set[str] = set()


def _announce(description: str, fallback: bool = False) -> None:
    """Log what runs, once per process; `fallback` (a CUDA session that failed where CUDA is there, the
    CPU running instead) as a warning, which a quiet batch job (`--quiet`: the "kerasllm" logger at
    WARNING) still shows; `--device auto` on a machine without CUDA is no such thing."""
    if description not in _ANNOUNCED:
        _ANNOUNCED.add(description)
        log.log(logging.WARNING if fallback else logging.INFO, description)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def create_session(path: str | Path, device: str | None = None, threads: int | None = None,
                   cuda_graph: bool = False, graph: bytes | None = None) -> Session:
    """Open `path` on `device` (see the module docstring); logs one line saying what runs (once per
    process for each provider and reason).

    `cuda_graph` (CUDA only): open it with ORT's `enable_cuda_graph`, for `DecoderSession`'s
    captured decode steps. Every run of such a session has to name its graph (`gpu_graph_id`,
    -1 for none), which `DecoderSession` does. Where ORT refuses (a node on the CPU provider
    that needs a copy), the session opens without it and a warning quotes ORT.

    `graph`: the graph's bytes, opened instead of reading `path` (which then only names it in
    messages): `Bundle.graph_bytes`, checked against the manifest once and not read again.

    A graph ONNX Runtime cannot load is a `BundleError` naming the file. (A bundle's loaders then
    check the graph against its manifest: `Bundle.open_session`.)"""
    path = str(path)
    model = path if graph is None else graph
    if graph is None and not _utf8(path):
        # ONNX Runtime takes a path as UTF-8 text: a directory name that is not (surrogate-escaped
        # bytes, or any non-ASCII name under a C locale) had failed as "incompatible constructor
        # arguments", reported as a broken graph. Its bytes load anywhere (a graph with external
        # data, > 2 GB, still needs its path).
        model = Path(path).read_bytes()
    kind, device_id = parse_device(device)
    # Built before the loads below: their handlers report any failure as the graph's (or CUDA's), and
    # a bad KERASLLM_ORT_SPINNING is the user's setting, not a broken bundle. ORT copies the options
    # into each session, so the CUDA attempts and the CPU session share them.
    options = _options(_SILENT, threads)
    reason = "CPU requested"
    if kind in ("auto", "cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reason = "this onnxruntime build has no CUDA provider"
        else:
            # Silence the provider's load-failure block; the result is checked below.
            ort.set_default_logger_severity(_SILENT)
            session, captured = None, cuda_graph
            try:
                while session is None:
                    provider = {"device_id": device_id, **({"enable_cuda_graph": "1"} if captured else {})}
                    try:
                        with flush_denormals():
                            session = ort.InferenceSession(model, options,
                                                           providers=[("CUDAExecutionProvider", provider),
                                                                      "CPUExecutionProvider"])
                    except Exception as err:  # ORT raises its own exception types
                        if not (captured and "cuda graph" in str(err).lower()):
                            raise
                        log.warning("CUDA graphs refused, running without them: %s", str(err).splitlines()[0][:300])
                        captured = False
            except Exception as err:  # ORT raises its own exception types
                session, reason = None, f"CUDA session failed ({str(err).splitlines()[0][:200]})"
            finally:
                ort.set_default_logger_severity(_QUIET)
            if session is not None and session.get_providers()[0] == "CUDAExecutionProvider":
                description = (f"ONNX Runtime {ort.__version__} on CUDAExecutionProvider (cuda:{device_id})"
                               + (", CUDA graphs" if captured else ""))
                _announce(description)
                return Session(session, "cuda", device_id, description, cuda_graph=captured, path=path)
            if session is not None:
                reason = "CUDA provider did not load (no CUDA driver or libraries)"
        if kind == "cuda":
            raise KerasLLMError(f"device {device}: {reason}")
    try:
        with flush_denormals():  # undoes what the process's first session does to this thread
            # No fallback: ORT's is to the CPU provider, this one, and it announces the retry on stdout.
            # Silent: a kernel's failure comes back as an exception, which the callers turn into one
            # line; ORT's logger printed it too (a coloured line before that one).
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=CPU_DISABLED_OPTIMIZERS, enable_fallback=0)
    except Exception as err:
        memory = _out_of_memory(err)
        if memory:  # (it had read as a broken bundle: an operator re-exports a good one)
            raise KerasLLMError(f"{path}: out of memory while ONNX Runtime loaded this graph ({memory}): free "
                                "memory or raise the process's limits (ulimit -v, a container's memory)") from None
        # A graph that passed its checksum can still be unloadable (damaged before the manifest was
        # written, or the manifest rewritten to match): one line, as for a failed checksum. Whatever
        # ORT raises: its own types (InvalidProtobuf, Fail, InvalidGraph, ...), but also a builtin
        # UnicodeDecodeError when its message quotes a damaged name.
        raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({ort_message(err)})") from None
    description = f"ONNX Runtime {ort.__version__} on CPUExecutionProvider ({reason})"
    _announce(description, fallback=reason.startswith("CUDA session failed"))
    return Session(session, "cpu", 0, description, path=path)


def _out_of_memory(err: BaseException) -> str | None:
    """What says ONNX Runtime failed for want of memory, else None: C++'s std::bad_alloc, or a thread
    it could not start (pthread_create's ENOMEM 12 or EAGAIN 11: `ulimit -v`, a container's limits)."""
    text = str(err)
    if isinstance(err, MemoryError) or "bad_alloc" in text:
        return "std::bad_alloc" if "bad_alloc" in text else "MemoryError"
    thread = re.search(r"pthread_create failed, error code: (11|12)\b", text)
    return f"cannot start a thread: pthread_create error {thread.group(1)}" if thread else None


def raised_by_onnxruntime(err: BaseException) -> bool:
    """Whether ONNX Runtime raised `err`: its own exception types from `run`, but a plain RuntimeError
    from `run_with_iobinding`, told apart by the module of the innermost frame it came from."""
    frames = traceback.extract_tb(err.__traceback__)
    return type(err).__module__.startswith("onnxruntime") or (
        bool(frames) and "onnxruntime" in Path(frames[-1].filename).parts)


def ort_message(err: Exception) -> str:
    """The first line of an ONNX Runtime error's message (at most 300 characters), for one-line errors.

    ORT's message can quote a damaged graph's bytes (a node's op type with a flipped bit), which its
    Python binding then fails to decode: the UnicodeDecodeError carries the message as bytes."""
    if isinstance(err, UnicodeDecodeError) and isinstance(err.object, bytes):
        text = err.object.decode("utf-8", "replace")
    else:
        text = str(err) or type(err).__name__
    return (text.splitlines() or [""])[0][:300]


# Model metadata written by optimize.share_kv_buffer: the graph updates a fixed-size KV buffer in place.
KV_CACHE_METADATA = "kerasllm.kv_cache"
SHARED_BUFFER = "shared_buffer"
# Model metadata written by optimize.fuse_cached_attention where a seq2seq decoder's cross-attention
# groups its query rows per row of the encoder's keys/values: those inputs may hold one row per input
# (CROSS_ROWS_PER_INPUT) for query rows that come in equal contiguous groups per input (beams), as
# well as one row per query row.
CROSS_ROWS_METADATA = "kerasllm.cross_attention_rows"
CROSS_ROWS_PER_INPUT = "per_input"
# Optional decoder output (optimize.add_next_token): the last position's argmax, `[B, 1]` int64.
NEXT_TOKEN = "next_token"
# Model metadata written with it where the argmax skips ids (a JSON list; absent: none skipped).
SUPPRESSED_METADATA = "kerasllm.next_token_suppressed_ids"
# Slots a shared KV buffer gets beyond the prompt; it doubles when a row outgrows it.
_BUFFER_HEADROOM = 128
# Shapes (batch, capacity) whose static-step tensors a DecoderSession keeps (each holds a KV buffer).
MAX_STEP_SLOTS = 4


def buffer_slots_bound(max_length: int) -> int:
    """The most slots `DecoderSession` gives a shared KV buffer while every row holds at most
    `max_length` tokens (a prompt's buffer, `_buffer_prompt`, doubled once by `_KVBuffer.advance`).
    GroupQueryAttention's rotary cos/sin tables need a row per slot (ORT checks them against
    `total_sequence_length`, the buffer's width), so rotary exports size them with this."""
    return 2 * -(-(max_length + _BUFFER_HEADROOM) // 64) * 64


def reorder_rows_in_place(array: np.ndarray, indices: np.ndarray, used: int | None = None) -> None:
    """`array[:len] = array[indices]` for a same-size reorder, copying only the rows that move
    (beam search keeps most beams' parents) and, when `used` is given, only the first
    `used` slots of axis 2 (the filled part of a KV buffer)."""
    moved = np.flatnonzero(indices != np.arange(len(indices)))
    if moved.size and used is None:
        array[moved] = array[indices[moved]]
    elif moved.size:
        array[moved, :, :used] = array[indices[moved], :, :used]


def reorder_outputs_in_place(values, indices: np.ndarray) -> bool:
    """Reorder ORT's CPU outputs (`OrtValue`s) in place when it is possible: for a same-size
    reorder (beam search). Returns False, touching nothing, otherwise."""
    if len(indices) != values[0].shape()[0]:
        return False
    for value in values:  # ORT's CPU outputs: `.numpy()` is a writable view
        reorder_rows_in_place(value.numpy(), indices)
    return True


class DecoderSession:
    """A decoder graph with a KV cache (`past_key_values.*` -> `present.*`), run step by step.

    `step(input_ids, attention_mask, cache)` returns `(logits [B, T, V] float32 on the host,
    cache)`, in generate.py's layout: prompts left-padded, `attention_mask` growing by the
    new tokens each step, the cache opaque (None before the first step).
    `reorder(cache, indices)` selects batch rows (beam search); `presents(cache)` gives the
    cache as host arrays `[B, H, S, D]` in that same layout (validation).

    Two graph kinds (see export/optimize.py), told apart by the graph's metadata:
    * growing cache: presents are `concat(past, new)`; the cache is the list of present
      `OrtValue`s on the session's device, bound as the next step's past.
    * shared buffer (`share_kv_buffer`, fp32 graphs whose attention is fused): one
      `[B, H, capacity, D]` buffer per cache tensor, bound as both past and present and
      written in place by GroupQueryAttention; rows are right-aligned in it (each row's
      tokens first), so this class moves a left-padded prompt to the left of its rows
      and the logits back. A single-token step reuses one IO binding, its inputs and its
      logits buffer: on a small model the per-step binding work otherwise costs as much
      as a fifth of the step.

    On CUDA the cache stays on the device between steps (reorders included) and only the
    logits, or greedy's token ids, come back.

    Args:
        session: a `Session` over a graph with the decoder I/O (see export/convert.py).
    """

    def __init__(self, session: Session, static_steps: bool | None = None, host_buffers: bool | None = None):
        self.session = session
        # KV buffers as NumPy arrays wrapped by ORT (the CPU), or tensors on the session's device that
        # only ORT touches (CUDA; `host_buffers=False` runs that path on the CPU, for the tests).
        self.host_buffers = session.device_type == "cpu" if host_buffers is None else host_buffers
        inputs = session.session.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        self.present_names = [n for n in session.output_names if n.startswith("present.")]
        if not self.past_names or len(self.past_names) != len(self.present_names):
            raise BundleError(f"{session.path or 'the graph'}: not a decoder graph with a KV cache (no "
                              "past_key_values.*/present.* inputs and outputs)")
        past = next(i for i in inputs if i.name == self.past_names[0])
        self.num_heads, self.head_dim = past.shape[1], past.shape[3]
        self.cache_dtype = session.input_types[self.past_names[0]]
        self.ids_dtype = session.input_types["input_ids"]
        outputs = session.output_names
        self._logits_index = outputs.index("logits")
        self._present_index = [outputs.index(name) for name in self.present_names]
        metadata = session.session.get_modelmeta().custom_metadata_map
        self.shared_buffer = metadata.get(KV_CACHE_METADATA) == SHARED_BUFFER
        self._vocab = session.session.get_outputs()[self._logits_index].shape[-1]
        # Optional input (optimize.keep_last_logits): the prompt step computes the logits it needs only.
        self._logits_to_keep = any(i.name == "logits_to_keep" for i in session.session.get_overridable_initializers())
        # Optional output (optimize.add_next_token, fp16 graphs): `greedy_step` takes the token ids
        # from it and leaves the logits where the graph ran.
        self.greedy_on_device = NEXT_TOKEN in outputs
        # Static steps (`_StepSlot`): on a `cuda_graph` session (or when asked: the tests run them on
        # the CPU), the single-token steps over the shared buffer bind fixed tensors, kept per
        # (batch, capacity), and on CUDA replay one captured graph per shape.
        wanted = session.cuda_graph if static_steps is None else static_steps
        self.static_steps = wanted and self.shared_buffer and self.greedy_on_device
        if session.cuda_graph and not self.static_steps:
            log.warning("CUDA graphs need a shared-KV-buffer graph with next_token (export with --dtype fp16): "
                        "decode steps run without them")
        self._slots: dict[tuple[int, int], _StepSlot] = {}
        self._graph_ids = itertools.count(1)
        self._run_options: dict[int, ort.RunOptions] = {}
        if self.shared_buffer and session.device_type == "cuda" and self.cache_dtype == np.float32:
            # ORT places the node on the CPU provider and copies the cache across every step.
            log.warning("this fp32 bundle's GroupQueryAttention has no CUDA kernel (fp16/bf16 only) and runs on "
                        "the CPU; for GPU serving export with --kv-cache growing or --dtype fp16")

    def _to_device(self, array: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(array, self.session.device_type, self.session.device_id)

    def _run(self, binding, graph_id: int = -1) -> None:
        """Run `binding`. A `cuda_graph` session replays graph `graph_id` (captured at its first runs
        by ORT), and every other run has to say -1, or ORT would replay graph 0 on it."""
        if not self.session.cuda_graph:
            self.session.session.run_with_iobinding(binding)
            return
        options = self._run_options.get(graph_id)
        if options is None:
            options = self._run_options[graph_id] = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.session.run_with_iobinding(binding, options)

    def _take_slot(self, batch: int, capacity: int) -> _StepSlot | None:
        """The fixed tensors of a static step of this shape, or None while another buffer holds them.
        At most `MAX_STEP_SLOTS` shapes are kept (the oldest dropped, its graph id never reused)."""
        key = (batch, capacity)
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= MAX_STEP_SLOTS:
                for old_key, old in list(self._slots.items()):
                    if not old.in_use:
                        del self._slots[old_key]
                        break
            graph_id = next(self._graph_ids) if self.session.cuda_graph else -1
            slot = self._slots[key] = _StepSlot(self, batch, capacity, graph_id)
        elif slot.in_use:
            return None
        else:  # most recently used last: the oldest are dropped first
            self._slots[key] = self._slots.pop(key)
        slot.in_use = True
        return slot

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache=None):
        if self.shared_buffer:
            return self._buffer_step(input_ids, attention_mask, cache)
        return self._growing_step(input_ids, attention_mask, cache)

    __call__ = step  # a DecoderSession is a step function (see generate.py)

    def greedy_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache):
        """A step after the prompt's (`cache` not None, one token per row) that returns greedy decoding's
        choice instead of the logits: `(next ids [B, 1] int64, cache)`. Graphs with `greedy_on_device`
        only: the argmax runs in the graph (on CUDA the logits stay on the device)."""
        if self.shared_buffer:
            cache.advance(input_ids)
            self._run(cache.binding, cache.graph_id)
            return cache.outputs.next_ids(), cache
        return self._growing_step(input_ids, attention_mask, cache, greedy=True)

    def _growing_step(self, input_ids, attention_mask, cache, greedy: bool = False):
        if cache is None:
            empty = np.zeros((input_ids.shape[0], self.num_heads, 0, self.head_dim), self.cache_dtype)
            cache = [self._to_device(empty) for _ in self.past_names]
        binding = self.session.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, self.ids_dtype))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        for name, value in zip(self.past_names, cache):
            binding.bind_ortvalue_input(name, value)
        # Greedy: the logits stay where the graph ran and only the chosen ids come back.
        binding.bind_output("logits", self.session.device_type if greedy else "cpu", self.session.device_id)
        for name in self.present_names:
            binding.bind_output(name, self.session.device_type, self.session.device_id)
        if greedy:
            binding.bind_output(NEXT_TOKEN, "cpu")
        self._run(binding)
        outputs = binding.get_outputs()  # in binding order: logits, the presents, next_token
        present = [outputs[i] for i in self._present_index]
        if greedy:
            return outputs[-1].numpy(), present
        return outputs[self._logits_index].numpy().astype(np.float32, copy=False), present

    def last_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """The prompt step for decoding: `(logits [B, V] of each row's last token, cache)`,
        computing only the positions needed where the graph takes `logits_to_keep`."""
        if self.shared_buffer:
            return self._buffer_prompt(np.asarray(input_ids), np.asarray(attention_mask), last_only=True)
        logits, cache = self.step(input_ids, attention_mask, None)
        return logits[:, -1], cache

    def reorder(self, cache, indices: np.ndarray):
        """Rows `indices` of every cache tensor (beam search). `cache` is not valid afterwards: on the
        CPU a same-size reorder happens in place; on CUDA the rows are gathered on the device."""
        indices = np.asarray(indices)
        if self.shared_buffer:
            return cache.rows(indices)
        if self.host_buffers and reorder_outputs_in_place(cache, indices):
            return cache
        return self.gather_rows(cache, indices)

    def gather_rows(self, values, indices: np.ndarray) -> list:
        """New tensors with rows `indices` of `values`, gathered where they are (row_gather.py)."""
        from kerasllm.export.row_gather import gather_rows  # noqa: PLC0415

        return gather_rows(values, indices, self.session.device_type, self.session.device_id)

    def presents(self, cache) -> list[np.ndarray]:
        """The cache as host arrays `[B, H, S, D]`, rows left-padded like the loop's mask."""
        if not self.shared_buffer:
            return [value.numpy() for value in cache]
        return cache.left_padded()

    # -- the shared-buffer graph ---------------------------------------------------------------
    def _buffer_step(self, input_ids, attention_mask, cache):
        if cache is None:
            return self._buffer_prompt(np.asarray(input_ids), np.asarray(attention_mask))
        if input_ids.shape[1] > 1:
            # CPU GroupQueryAttention takes several new tokens on top of a past only at batch 1:
            # feed them one at a time (the same math, causal).
            width = attention_mask.shape[1] - input_ids.shape[1]
            logits = [self._buffer_step(input_ids[:, t:t + 1], attention_mask[:, :width + t + 1], cache)[0]
                      for t in range(input_ids.shape[1])]
            return np.concatenate(logits, axis=1), cache
        cache.advance(input_ids)
        self._run(cache.binding, cache.graph_id)
        return cache.logits_of_step(), cache

    def _buffer_prompt(self, input_ids, attention_mask, last_only: bool = False):
        batch, width = input_ids.shape
        lengths = attention_mask.sum(axis=1).astype(np.int64)
        # Left-padded rows -> right-padded: row b's tokens move to columns 0..n_b-1.
        shift = width - lengths
        columns = (np.arange(width)[None, :] + shift[:, None]) % width
        ids = np.take_along_axis(input_ids, columns, axis=1)
        capacity = -(-(width + _BUFFER_HEADROOM) // 64) * 64
        cache = _KVBuffer(self, batch, capacity, lengths, width)
        binding = self.session.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, self.ids_dtype))
        # All ones: every row counts `width` tokens, its padding after its real ones. Causal
        # masking keeps that padding out of every real token's view; its slots are
        # overwritten by the next tokens before any query reads them.
        binding.bind_cpu_input("attention_mask", np.ones((batch, width), np.int64))
        # Row b's last token is at column n_b - 1: the last `keep` columns hold every row's.
        keep = width - int(lengths.min()) + 1 if last_only and self._logits_to_keep else 0
        if keep:  # (bind_cpu_input finds no overridable initializer; an OrtValue binds)
            binding.bind_ortvalue_input("logits_to_keep", ort.OrtValue.ortvalue_from_numpy(np.array([keep], np.int64)))
        binding.bind_output("logits", "cpu")
        cache.bind_cache(binding)
        self._run(binding)
        logits = binding.get_outputs()[0].numpy().astype(np.float32, copy=False)  # outputs in binding order
        if last_only:  # logits[:, j] is column j + width - keep (all columns when keep is 0)
            return logits[np.arange(batch), lengths - 1 - (width - (keep or width))], cache
        # Back to the loop's layout (row slices: a fancy-index gather of [B, T, V] costs more);
        # padding positions get the right-padding's (unused) logits.
        out = np.empty_like(logits)
        for row, pad in enumerate(shift.tolist()):
            out[row, pad:] = logits[row, :width - pad]
            out[row, :pad] = logits[row, width - pad:]
        return out, cache


def cache_tensors(numpy_backed: bool, session: Session, dtype, count: int, shape: tuple, given: list | None = None):
    """A KV buffer's tensors: `(arrays, values)`, NumPy arrays and the `OrtValue`s wrapping them (not
    copies) when `numpy_backed`, else `(None, values)` on the session's device. `given`: those arrays
    (or device values) instead of `count` new uninitialized ones of `shape` (GroupQueryAttention
    reads only the slots below each row's length)."""
    if numpy_backed:
        arrays = given if given is not None else [np.empty(shape, dtype) for _ in range(count)]
        return arrays, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if given is not None:
        return None, given
    return None, [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, session.device_type, session.device_id)
                  for _ in range(count)]


def bind_cache(binding, past_names, present_names, values) -> None:
    """Bind each cache tensor as both its past input and its present output (updated in place)."""
    for past, present, value in zip(past_names, present_names, values):
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)


class StepOutputs:
    """Where a single-token step's logits (and `next_token`) go, bound once to the step's IO binding
    (the shared-buffer decoders of both families).

    On the CPU the logits land in a host array written in place. On CUDA, when the graph picks
    greedy tokens itself (`next_token`), the logits stay in a device buffer and cross to the host
    only when asked; otherwise ORT copies them to the host at every run. Bind the logits before
    any other output: `get_outputs()` lists outputs in binding order.
    """

    def __init__(self, binding, session: Session, batch: int, vocab: int, next_token: bool):
        self.binding = binding
        self.host = self.device = self.ids = None
        if session.device_type == "cpu":
            self.host = np.zeros((batch, 1, vocab), np.float32)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.host))
        elif next_token:
            self.device = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1, vocab), np.float32,
                                                                    session.device_type, session.device_id)
            binding.bind_ortvalue_output("logits", self.device)
        else:
            binding.bind_output("logits", "cpu")
        if next_token:  # B int64 at a fixed place on the device (where a CUDA graph writes), read after the run
            self.ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), session.device_type,
                                                        session.device_id)
            binding.bind_ortvalue_output(NEXT_TOKEN, self.ids)

    def logits(self) -> np.ndarray:
        """The last run's logits `[B, 1, V]` float32 on the host (a copy: the next run overwrites them)."""
        if self.host is not None:
            return self.host.copy()
        if self.device is not None:
            return self.device.numpy()
        return self.binding.get_outputs()[0].numpy().astype(np.float32, copy=False)

    def next_ids(self) -> np.ndarray:
        """The last run's `next_token` `[B, 1]` (a copy)."""
        return self.ids.numpy().copy()  # on the CPU a view of the bound array


class _StepSlot:
    """What a shared-buffer decode step reads and writes, at fixed addresses, for one (batch,
    capacity): the KV buffers, the step's inputs (host arrays, uploaded in place into the bound
    tensors before each run), its outputs and their IO binding. A `DecoderSession` with static
    steps keeps a few and lends one to each `_KVBuffer` of that shape.

    Why: ORT replays a captured CUDA graph on the addresses it was captured with, so every run of
    graph `graph_id` must bind the same tensors; reusing them across calls also captures once per
    shape instead of once per batch (ORT keeps every captured graph for the session's life).
    """

    def __init__(self, owner: "DecoderSession", batch: int, capacity: int, graph_id: int):
        s = owner.session
        shape = (batch, owner.num_heads, capacity, owner.head_dim)
        self.arrays, self.values = cache_tensors(owner.host_buffers, s, owner.cache_dtype, len(owner.past_names), shape)
        self.ids = np.zeros((batch, 1), owner.ids_dtype)
        self.mask = np.zeros((batch, capacity), np.int64)
        # Tensors of their own, also on the CPU, so that the uploads are exercised there too.
        self.ids_value = ort.OrtValue.ortvalue_from_numpy(self.ids.copy(), s.device_type, s.device_id)
        self.mask_value = ort.OrtValue.ortvalue_from_numpy(self.mask.copy(), s.device_type, s.device_id)
        self.binding = s.session.io_binding()
        self.binding.bind_ortvalue_input("input_ids", self.ids_value)
        self.binding.bind_ortvalue_input("attention_mask", self.mask_value)
        self.outputs = StepOutputs(self.binding, s, batch, owner._vocab, next_token=True)
        bind_cache(self.binding, owner.past_names, owner.present_names, self.values)
        self.graph_id = graph_id
        self.in_use = False

    def upload(self) -> None:
        """Copy the host arrays `ids` and `mask` into the bound tensors."""
        self.ids_value.update_inplace(self.ids)
        self.mask_value.update_inplace(self.mask)


class _KVBuffer:
    """The cache of a shared-buffer graph: per-row token counts and one buffer per cache tensor.

    On the CPU (`numpy_backed`) each buffer is a numpy array wrapped (not copied) by the `OrtValue`
    bound as past and present, so ONNX Runtime writes into it and rows are selected with numpy;
    otherwise the buffers are tensors on the session's device that only ORT touches.
    """

    def __init__(self, owner: DecoderSession, batch: int, capacity: int, lengths: np.ndarray, width: int,
                 arrays: list | None = None):
        self.owner, self.batch, self.capacity = owner, batch, capacity
        self.lengths = lengths  # tokens in the buffer, per row
        self.longest = int(lengths.max())
        self.width = width  # the loop's mask width: row b is left-padded by width - lengths[b]
        s = owner.session
        self.numpy_backed = owner.host_buffers  # NumPy arrays wrapped by ORT, else device tensors
        shape = (batch, owner.num_heads, capacity, owner.head_dim)
        self.binding = None
        self.graph_id = -1  # the CUDA graph its single-token steps replay (-1: none)
        # Static steps: a slot's fixed tensors (a buffer grown or made of other rows gets fresh ones).
        self.slot = owner._take_slot(batch, capacity) if arrays is None and owner.static_steps else None
        if self.slot is not None:
            self.arrays, self.values = self.slot.arrays, self.slot.values
            return
        self.arrays, self.values = cache_tensors(self.numpy_backed, s, owner.cache_dtype, len(owner.past_names),
                                                 shape, arrays)

    def __del__(self):
        self.release()

    def release(self) -> None:
        """Give the slot back to its session (the buffer is done, or grows into new tensors)."""
        slot, self.slot = getattr(self, "slot", None), None
        if slot is not None:
            slot.in_use = False

    def bind_cache(self, binding) -> None:
        bind_cache(binding, self.owner.past_names, self.owner.present_names, self.values)

    def _single_token_binding(self) -> None:
        """One binding for every single-token step: inputs and logits live in arrays updated in place."""
        owner, s = self.owner, self.owner.session
        self._rows = np.arange(self.batch)
        if self.slot is not None:  # the slot's binding, its inputs rewritten for this buffer
            slot = self.slot
            self.ids, self.mask, self.binding, self.outputs = slot.ids, slot.mask, slot.binding, slot.outputs
            self.mask[...] = np.arange(self.capacity)[None, :] < self.lengths[:, None]
            self.graph_id = slot.graph_id
            return
        self.ids = np.zeros((self.batch, 1), owner.ids_dtype)
        self.mask = (np.arange(self.capacity)[None, :] < self.lengths[:, None]).astype(np.int64)
        self.binding = s.session.io_binding()
        self.binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self.ids))
        self.binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self.mask))
        self.outputs = StepOutputs(self.binding, s, self.batch, owner._vocab, owner.greedy_on_device)
        self.bind_cache(self.binding)

    def advance(self, input_ids: np.ndarray) -> None:
        """Make room for one more token per row and set up the binding's inputs for it."""
        if self.longest == self.capacity:
            self._grow(2 * self.capacity)
        if self.binding is None:
            self._single_token_binding()
        self.ids[:, 0] = input_ids[:, 0]
        self.mask[self._rows, self.lengths] = 1
        self.lengths += 1
        self.longest += 1
        self.width += 1
        if self.slot is not None:
            self.slot.upload()

    def logits_of_step(self) -> np.ndarray:
        return self.outputs.logits()

    def _host_arrays(self) -> list[np.ndarray]:
        return self.arrays if self.numpy_backed else [value.numpy() for value in self.values]

    def _grow(self, capacity: int) -> None:
        used = int(self.lengths.max())
        grown = []
        for array in self._host_arrays():
            bigger = np.zeros(array.shape[:2] + (capacity,) + array.shape[3:], array.dtype)
            bigger[:, :, :used] = array[:, :, :used]
            grown.append(bigger)
        self.release()
        self.__init__(self.owner, self.batch, capacity, self.lengths, self.width,
                      grown if self.numpy_backed else [self.owner._to_device(a) for a in grown])

    def rows(self, indices: np.ndarray) -> "_KVBuffer":
        """The cache of rows `indices`: this one, reordered in place, for a same-size reorder on
        the CPU (the binding stays valid); else a new one (on CUDA gathered on the device)."""
        indices = np.asarray(indices)
        if self.numpy_backed and len(indices) == self.batch:
            used = int(self.lengths.max())
            for array in self.arrays:
                reorder_rows_in_place(array, indices, used)
            self.lengths[:] = self.lengths[indices]
            self.longest = int(self.lengths.max())
            if self.binding is not None:
                self.mask[:] = self.mask[indices]
            return self
        if self.numpy_backed:
            arrays = [np.ascontiguousarray(array[indices]) for array in self.arrays]
        else:
            arrays = self.owner.gather_rows(self.values, indices)
        return _KVBuffer(self.owner, len(indices), self.capacity, self.lengths[indices].copy(), self.width, arrays)

    def left_padded(self) -> list[np.ndarray]:
        """`[B, H, width, D]` arrays: row b's tokens at the last `lengths[b]` positions, zeros before."""
        out = []
        for array in self._host_arrays():
            padded = np.zeros(array.shape[:2] + (self.width,) + array.shape[3:], array.dtype)
            for row, length in enumerate(self.lengths):
                padded[row, :, self.width - length:] = array[row, :, :length]
            out.append(padded)
        return out

"""Encoder-decoder bundles on ONNX Runtime: the two graphs and a step function. No TensorFlow.

A seq2seq bundle holds two graphs (declared in seq2seq_export.py):

    encoder.onnx  input_ids [B, S], attention_mask [B, S]
                  -> last_hidden_state [B, S, C],
                     present.{i}.encoder.key|value [B, H, S, D]   (cross-attention K/V, per decoder layer)
    decoder.onnx  input_ids [B, T], encoder_attention_mask [B, S],
                  past_key_values.{i}.encoder.key|value [B, H, S, D],
                  past_key_values.{i}.decoder.key|value [B, H, P, D]
                  -> logits [B, T, V], present.{i}.decoder.key|value [B, H, P + T, D]

(Optimum's names for encoder-decoder caches.) The encoder runs once per batch of
inputs; its cross-attention keys/values are bound to every decoder step, which only
adds one token's worth of self-attention cache. `Seq2SeqStep` wraps the decoder as a
step function for the shared decoding loops (generate.py: greedy, sampling, beam).

fp32 bundles exported with fused attention have a *shared-buffer* decoder instead
(seq2seq_export.share_self_attention_buffer, metadata `kerasllm.kv_cache`):

    decoder.onnx  input_ids [B, 1], seqlens_k [B] (int32: the tokens before the new one, also its
                  position), total_sequence_length (int32 scalar: M), encoder_attention_mask [B, S],
                  past_key_values.{i}.encoder.key|value [B, H, S, D],
                  past_key_values.{i}.decoder.key|value [B, H, M, D]
                  -> logits [B, 1, V], present.{i}.decoder.key|value: the same buffers, written in place

Decoders exported since 2026-12-06 (metadata `kerasllm.cross_attention_rows` = `per_input`,
optimize.fuse_cached_attention) also take the cross keys/values and the encoder mask with one row
per *input* where the B decoder rows come in equal contiguous groups per input (beam search's
`num_beams` rows): `[B / k, H, S, D]` for k rows each, the query rows reshaped to `[B / k, k, C]`
inside. `Seq2SeqStep` binds them that way whenever the rows allow it (`rows_per_input`): the
beams of an input read one copy of its keys/values (beam 4, 'small' preset: the 4 layers'
cross-attention at 64 rows 539 -> 241 us a step, one thread) and nothing is copied per beam.

(Bundles exported before 2026-12-05 take `attention_mask [B, M]`, ones in each row's first n
columns, n = tokens so far including the new one, instead of the two lengths; both are driven.)
`_SelfAttentionBuffer` drives it: one buffer per cache tensor bound as past and present,
and one IO binding per batch whose inputs and logits live in arrays updated in place, so
a step binds nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from kerasllm.errors import KerasLLMError
from kerasllm.export.runtime import (CROSS_ROWS_METADATA, CROSS_ROWS_PER_INPUT, KV_CACHE_METADATA, NEXT_TOKEN,
                                     SHARED_BUFFER, SUPPRESSED_METADATA, Session, StepOutputs, bind_cache,
                                     cache_tensors, create_session, reorder_outputs_in_place, reorder_rows_in_place)

log = logging.getLogger("kerasllm")
# Slots a shared self-attention buffer starts with (a multiple of 64); it doubles when full.
_BUFFER_SLOTS = 64
# The shared-buffer decoder's length inputs (GroupQueryAttention's names, see the module docs).
SEQLENS_K, TOTAL_SEQUENCE_LENGTH = "seqlens_k", "total_sequence_length"


def self_attention_slots_bound(max_length: int) -> int:
    """The most slots a `_SelfAttentionBuffer` reaches while a row holds at most `max_length` tokens
    (it starts at `_BUFFER_SLOTS` and doubles when full): the rows GroupQueryAttention's rotary
    cos/sin tables need (ORT checks them against `total_sequence_length`, the buffer's slots)."""
    slots = _BUFFER_SLOTS
    while slots < max_length:
        slots *= 2
    return slots


def cross_names(num_layers: int, prefix: str) -> list[str]:
    """`{prefix}.{i}.encoder.key|value` for every decoder layer, in graph order."""
    return [f"{prefix}.{i}.encoder.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def self_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.decoder.{kind}" for i in range(num_layers) for kind in ("key", "value")]


class Seq2SeqSessions:
    """The encoder and decoder sessions of a bundle (or of two graph files).

    Args:
        encoder: a `Session` over encoder.onnx.
        decoder: a `Session` over decoder.onnx.
    """

    def __init__(self, encoder: Session, decoder: Session, host_buffers: bool | None = None):
        self.encoder, self.decoder = encoder, decoder
        # Self-attention buffers as NumPy arrays wrapped by ORT (the CPU), or device tensors that only
        # ORT touches (CUDA; `host_buffers=False` runs that path on the CPU, for the tests).
        self.host_buffers = decoder.device_type == "cpu" if host_buffers is None else host_buffers
        names = [i.name for i in decoder.session.get_inputs()]
        self.past_names = [n for n in names if n.endswith((".decoder.key", ".decoder.value"))]
        self.cross_inputs = [n for n in names if n.endswith((".encoder.key", ".encoder.value"))]
        self.cross_outputs = [n.replace("past_key_values.", "present.") for n in self.cross_inputs]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        if not self.past_names or len(self.cross_inputs) != len(self.past_names):
            raise KerasLLMError("decoder graph lacks the past_key_values.*.decoder/encoder inputs")
        past = next(i for i in decoder.session.get_inputs() if i.name == self.past_names[0])
        self.num_heads, self.head_dim = past.shape[1], past.shape[3]
        self.cache_dtype = decoder.input_types[self.past_names[0]]
        self._bound = None  # (cross, encoder mask, mask OrtValue, binding) of the last step
        metadata = decoder.session.get_modelmeta().custom_metadata_map
        self.shared_buffer = metadata.get(KV_CACHE_METADATA) == SHARED_BUFFER
        # The cross keys/values may hold one row per input for rows grouped per input (optimize.py).
        self.cross_per_input = metadata.get(CROSS_ROWS_METADATA) == CROSS_ROWS_PER_INPUT
        self.lengths_as_inputs = SEQLENS_K in names  # else an attention_mask (older bundles)
        outputs = decoder.session.get_outputs()
        self.vocab = outputs[[o.name for o in outputs].index("logits")].shape[-1]
        # The `next_token` output (optimize.add_next_token, fp16 graphs) serves greedy steps on the buffer.
        self.greedy_on_device = self.shared_buffer and NEXT_TOKEN in [o.name for o in outputs]
        # The ids its argmax skips (bundles exported before 2026-12-06 skip none: the host chooses for them).
        self.suppressed_on_device = tuple(json.loads(metadata.get(SUPPRESSED_METADATA, "[]")))
        if self.shared_buffer and decoder.device_type == "cuda" and self.cache_dtype == np.float32:
            # ORT places the node on the CPU provider and copies the cache across every step.
            log.warning("this fp32 bundle's GroupQueryAttention has no CUDA kernel (fp16/bf16 only) and runs on "
                        "the CPU; for GPU serving export with --kv-cache growing or --dtype fp16")

    @classmethod
    def open(cls, encoder_path: str | Path, decoder_path: str | Path, device: str | None = None,
             threads: int | None = None, host_buffers: bool | None = None) -> "Seq2SeqSessions":
        return cls(create_session(encoder_path, device, threads), create_session(decoder_path, device, threads),
                   host_buffers)

    def gather_rows(self, values, indices: np.ndarray) -> list:
        """New tensors with rows `indices` of `values`, gathered where they are (row_gather.py)."""
        from kerasllm.export.row_gather import gather_rows  # noqa: PLC0415

        return gather_rows(values, indices, self.decoder.device_type, self.decoder.device_id)

    def _device_value(self, array: np.ndarray):
        s = self.decoder
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), s.device_type, s.device_id)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list:
        """Cross-attention keys/values per decoder layer (`OrtValue`s on the session's device)."""
        session = self.encoder
        binding = session.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        for name in self.cross_outputs:
            binding.bind_output(name, session.device_type, session.device_id)
        session.session.run_with_iobinding(binding)
        outputs = dict(zip(self.cross_outputs, binding.get_outputs()))
        return [outputs[name] for name in self.cross_outputs]

    def step(self, input_ids: np.ndarray, encoder_mask: np.ndarray, cross: Sequence, past, greedy: bool = False):
        """One decoder step; returns `(logits [B, T, V] float32 on the host, cache)`: the cache is
        the list of presents, or a `_SelfAttentionBuffer` for a shared-buffer graph (None before
        the first step either way; `presents(cache)` gives host arrays). `greedy` (a single-token
        step on the buffer of a `greedy_on_device` graph): `(next ids [B, 1] int64, cache)` instead."""
        if greedy:
            return past.run(input_ids, encoder_mask, cross, greedy=True), past
        if self.shared_buffer:
            return self._buffer_step(np.asarray(input_ids), encoder_mask, cross, past)
        if past is None:
            empty = np.zeros((input_ids.shape[0], self.num_heads, 0, self.head_dim), self.cache_dtype)
            past = [self._device_value(empty) for _ in self.past_names]
        session = self.decoder
        # The encoder's side stays bound from one step to the next (the same `cross` list and
        # mask, as Seq2SeqStep passes them): per step only the new tokens and the cache move.
        if self._bound is None or self._bound[0] is not cross or self._bound[1] is not encoder_mask:
            binding = session.session.io_binding()
            mask = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(encoder_mask, np.int64))
            binding.bind_ortvalue_input("encoder_attention_mask", mask)
            for name, value in zip(self.cross_inputs, cross):
                binding.bind_ortvalue_input(name, value)
            self._bound = (cross, encoder_mask, mask, binding)
        binding = self._bound[3]
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, session.device_type, session.device_id)
        session.session.run_with_iobinding(binding)
        outputs = dict(zip(session.output_names, binding.get_outputs()))
        logits = outputs["logits"].numpy().astype(np.float32, copy=False)
        return logits, [outputs[name] for name in self.present_names]

    def _buffer_step(self, input_ids, encoder_mask, cross, cache):
        if cache is None:
            cache = _SelfAttentionBuffer(self, len(input_ids), _BUFFER_SLOTS)
        if input_ids.shape[1] > 1:
            # CPU GroupQueryAttention takes several new tokens on top of a past only at batch 1:
            # one at a time (the same math, causal).
            logits = [self._buffer_step(input_ids[:, t:t + 1], encoder_mask, cross, cache)[0]
                      for t in range(input_ids.shape[1])]
            return np.concatenate(logits, axis=1), cache
        return cache.run(input_ids, encoder_mask, cross), cache

    def presents(self, cache) -> list[np.ndarray]:
        """The self-attention cache as host arrays `[B, H, P, D]` (validation)."""
        if isinstance(cache, _SelfAttentionBuffer):
            return cache.presents()
        return [value.numpy() for value in cache]

    def rows(self, values: Sequence, indices: np.ndarray) -> list:
        """Rows `indices` of every tensor, as new tensors (on CUDA gathered on the device)."""
        if self.host_buffers:
            return [self._device_value(value.numpy()[indices]) for value in values]
        return self.gather_rows(values, indices)

    def reorder(self, values: Sequence, indices: np.ndarray) -> list:
        """`rows`, for a cache that is not used afterwards: on the CPU a same-size reorder
        (beam search) happens in place, copying only the rows that move."""
        indices = np.asarray(indices)
        if isinstance(values, _SelfAttentionBuffer):
            return values.rows(indices)
        if self.host_buffers and reorder_outputs_in_place(values, indices):
            return list(values)
        return self.rows(values, indices)


class _SelfAttentionBuffer:
    """The self-attention cache of a shared-buffer decoder: `length` tokens in every row (decoder
    rows are never padded) of one `[B, H, capacity, D]` buffer per cache tensor.

    On the CPU each buffer is a numpy array wrapped (not copied) by the `OrtValue` bound as
    past and present, so ONNX Runtime writes into it and rows are selected with numpy. The
    binding is made once (first step) with the encoder side; it is rebound only when the
    encoder side changes (rows moved between inputs) or the buffer grows.
    """

    def __init__(self, owner: Seq2SeqSessions, batch: int, capacity: int, length: int = 0, arrays=None):
        self.owner, self.batch, self.capacity, self.length = owner, batch, capacity, length
        s = owner.decoder
        self.numpy_backed = owner.host_buffers  # NumPy arrays wrapped by ORT, else device tensors
        shape = (batch, owner.num_heads, capacity, owner.head_dim)
        self.arrays, self.values = cache_tensors(self.numpy_backed, s, owner.cache_dtype, len(owner.past_names),
                                                 shape, arrays)
        self.binding = None
        self.encoder_side = None  # (cross, encoder mask) bound

    def _bind(self) -> None:
        owner = self.owner
        self.ids = np.zeros((self.batch, 1), np.int64)
        self.binding = binding = owner.decoder.session.io_binding()
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self.ids))
        if owner.lengths_as_inputs:  # every row holds `length` tokens: one value for all
            self.seqlens = np.full(self.batch, self.length, np.int32)
            binding.bind_ortvalue_input(SEQLENS_K, ort.OrtValue.ortvalue_from_numpy(self.seqlens))
            self.total = np.array(self.capacity, np.int32)
            binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, ort.OrtValue.ortvalue_from_numpy(self.total))
        else:
            self.mask = (np.arange(self.capacity)[None, :] < np.full((self.batch, 1), self.length)).astype(np.int64)
            binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self.mask))
        self.outputs = StepOutputs(binding, owner.decoder, self.batch, owner.vocab, owner.greedy_on_device)
        bind_cache(binding, owner.past_names, owner.present_names, self.values)
        self.encoder_side = None

    def run(self, input_ids: np.ndarray, encoder_mask: np.ndarray, cross: Sequence, greedy: bool = False) -> np.ndarray:
        """One token per row: logits `[B, 1, V]`, or with `greedy` the graph's choice `[B, 1]`."""
        if self.length + 1 > self.capacity:
            self._grow(2 * self.capacity)
        if self.binding is None:
            self._bind()
        if self.encoder_side is None or self.encoder_side[0] is not cross or self.encoder_side[1] is not encoder_mask:
            mask = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(encoder_mask, np.int64))
            self.binding.bind_ortvalue_input("encoder_attention_mask", mask)
            for name, value in zip(self.owner.cross_inputs, cross):
                self.binding.bind_ortvalue_input(name, value)
            self.encoder_side = (cross, encoder_mask, mask)
        self.ids[...] = input_ids  # [B, 1]: one NumPy call (each costs ~5-9 us between runs)
        if self.owner.lengths_as_inputs:
            self.seqlens.fill(self.length)  # the tokens before the new one
        else:
            self.mask[:, self.length] = 1
        self.length += 1
        self.owner.decoder.session.run_with_iobinding(self.binding)
        return self.outputs.next_ids() if greedy else self.outputs.logits()

    def _host_arrays(self) -> list[np.ndarray]:
        return self.arrays if self.numpy_backed else [value.numpy() for value in self.values]

    def _resized(self, indices: np.ndarray | None, capacity: int) -> "_SelfAttentionBuffer":
        if not self.numpy_backed and indices is not None and capacity == self.capacity:  # beam search on CUDA
            return _SelfAttentionBuffer(self.owner, len(indices), capacity, self.length,
                                        self.owner.gather_rows(self.values, indices))
        arrays = []
        for array in self._host_arrays():
            filled = array[:, :, :self.length]  # a view: only the filled slots are gathered and copied
            rows = filled if indices is None else filled[indices]
            copy = np.empty(rows.shape[:2] + (capacity,) + rows.shape[3:], array.dtype)
            copy[:, :, :self.length] = rows
            arrays.append(copy)
        if not self.numpy_backed:
            arrays = [self.owner._device_value(a) for a in arrays]
        batch = self.batch if indices is None else len(indices)
        return _SelfAttentionBuffer(self.owner, batch, capacity, self.length, arrays)

    def _grow(self, capacity: int) -> None:
        grown = self._resized(None, capacity)
        self.capacity, self.arrays, self.values, self.binding = capacity, grown.arrays, grown.values, None

    def rows(self, indices: np.ndarray) -> "_SelfAttentionBuffer":
        """The cache of rows `indices`: on the CPU, unless the batch grows, this one reordered in
        place, copying only the rows that move and only their filled slots. A same-size reorder
        (beam search) keeps the binding; fewer rows (finished rows or inputs leaving) become the
        first rows of the same buffers, rebound at the next step: 'small' preset, 8 -> 7 rows at
        12 tokens, ~190 us for a new buffer (every slot copied twice) against ~30 us. On CUDA,
        or for more rows (beams expanded), a new buffer (on CUDA gathered on the device)."""
        if self.numpy_backed and len(indices) <= self.batch:
            for array in self.arrays:
                reorder_rows_in_place(array, indices, self.length)
            if len(indices) < self.batch:  # the leading rows of a C-order buffer are contiguous
                self.batch = len(indices)
                self.arrays = [array[:self.batch] for array in self.arrays]
                self.values = [ort.OrtValue.ortvalue_from_numpy(array) for array in self.arrays]
                self.binding = None
            return self
        return self._resized(indices, self.capacity)

    def presents(self) -> list[np.ndarray]:
        return [np.array(array[:, :, :self.length]) for array in self._host_arrays()]


class Seq2SeqStep:
    """The decoder as a step function over one encoded batch (see generate.py).

    `step(input_ids, attention_mask, cache)`: `attention_mask` is the decoder's, which
    generate.py grows each step; decoder inputs are never padded (every row starts with
    BOS), so only the encoder mask matters. The cache is `(past, row_sources)`; the
    cross-attention keys/values are bound with one row per input where the decoder takes its
    rows grouped per input (`Seq2SeqSessions.cross_per_input`), else copied to one row per beam
    once; either way they change only when the rows' inputs do (inputs that are done leave:
    the kept rows move up in place), never as beams reorder within an input.
    """

    def __init__(self, sessions: Seq2SeqSessions, input_ids: np.ndarray, attention_mask: np.ndarray):
        self.sessions = sessions
        self.source_mask = np.asarray(attention_mask, np.int64)
        self.source_cross = sessions.encode(input_ids, self.source_mask)
        # Row i of the decoder serves input `sources[i]`.
        self.sources = np.arange(len(input_ids))
        # The input of each row of `cross`: one per decoder row, or one per group of rows where the
        # decoder groups its queries (`cross_per_input`: the beams of an input share its row).
        self.cross_rows = self.sources
        self.cross, self.encoder_mask = self.source_cross, self.source_mask
        self.cross_arrays = None  # host arrays behind `cross` when they were gathered here (CPU)
        self.per_input = getattr(sessions, "cross_per_input", False)  # the Keras reference sessions: no

    def _group(self, sources: np.ndarray) -> int:
        """Decoder rows per row of `cross` for rows serving `sources`."""
        return rows_per_input(sources) if self.per_input else 1

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache, greedy: bool = False):
        past, sources = cache if cache is not None else (None, np.arange(len(input_ids)))
        if sources is not self.sources:  # the same array from step to step unless rows moved
            sources = np.asarray(sources)
            if not np.array_equal(sources, self.sources):
                wanted = sources[::self._group(sources)]
                if not np.array_equal(wanted, self.cross_rows):
                    self._select_cross(wanted)
            self.sources = sources
        logits, present = self.sessions.step(input_ids, self.encoder_mask, self.cross, past, greedy=greedy)
        return logits, (present, sources)

    def _select_cross(self, wanted: np.ndarray) -> None:
        """Bind the cross keys/values (and encoder mask) of inputs `wanted`, one per row of `cross`."""
        if np.array_equal(wanted, np.arange(len(self.source_mask))):  # every input once, in order
            self.cross, self.cross_arrays = self.source_cross, None
        elif self.sessions.host_buffers:  # kept, for rows leaving in place (reorder)
            self.cross_arrays = [value.numpy()[wanted] for value in self.source_cross]
            self.cross = [self.sessions._device_value(array) for array in self.cross_arrays]
        else:
            self.cross = self.sessions.rows(self.source_cross, wanted)
        self.encoder_mask = self.source_mask[wanted]
        self.cross_rows = wanted

    @property
    def greedy_on_device(self) -> bool:
        return getattr(self.sessions, "greedy_on_device", False)  # the Keras reference sessions have none

    @property
    def suppressed_on_device(self) -> tuple[int, ...]:
        return getattr(self.sessions, "suppressed_on_device", ())

    def greedy_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache):
        """A step after the first: `(next ids [B, 1], cache)`, the argmax made in the graph
        (generate.greedy_on_device; only for `greedy_on_device` sessions)."""
        return self(input_ids, attention_mask, cache, greedy=True)

    def reorder(self, cache, indices: np.ndarray):
        past, sources = cache
        indices = np.asarray(indices)
        sources = np.asarray(sources)
        kept_sources = sources[indices]
        if self.cross_arrays is not None and sources is self.sources and len(indices) < len(sources):
            # Rows leave (beam search: inputs that are done): the cross keys/values gathered for the
            # rows (the host arrays of __call__, not the encoder's own outputs) keep the rows that
            # stay, moved up in place, as the self-attention buffer does, instead of a fresh gather
            # from the encoder's outputs: a fresh gather allocates, and its page faults made it ~2 ms
            # a time at 64 rows (the 'small' preset, 32 source tokens, CPU).
            # The row of `cross` each new group of rows reads (every row of a group serves one input).
            keep = indices[::self._group(kept_sources)] // (len(sources) // len(self.cross_rows))
            if len(keep) <= len(self.cross_rows):  # else (rows no longer grouped) __call__ gathers anew
                for array in self.cross_arrays:
                    reorder_rows_in_place(array, keep)
                self.cross_arrays = [array[:len(keep)] for array in self.cross_arrays]  # views: contiguous
                self.cross = [self.sessions._device_value(array) for array in self.cross_arrays]
                self.encoder_mask = self.encoder_mask[keep]
                self.cross_rows = self.cross_rows[keep]
                self.sources = kept_sources
                return self.sessions.reorder(past, indices), self.sources
        return self.sessions.reorder(past, indices), kept_sources


def rows_per_input(sources: np.ndarray) -> int:
    """How many decoder rows each input has when `sources` (each row's input) is made of equal
    contiguous groups, one per input (beam search's layout: `num_beams` rows per input), else 1."""
    count = len(np.unique(sources))
    if count == 0 or len(sources) % count:
        return 1
    size = len(sources) // count
    groups = sources.reshape(count, size)
    return size if (groups == groups[:, :1]).all() else 1

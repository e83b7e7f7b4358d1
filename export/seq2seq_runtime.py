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
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from kerasllm.errors import KerasLLMError
from kerasllm.export.runtime import Session, create_session, reorder_outputs_in_place


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

    def __init__(self, encoder: Session, decoder: Session):
        self.encoder, self.decoder = encoder, decoder
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

    @classmethod
    def open(cls, encoder_path: str | Path, decoder_path: str | Path, device: str | None = None,
             threads: int | None = None) -> "Seq2SeqSessions":
        return cls(create_session(encoder_path, device, threads), create_session(decoder_path, device, threads))

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

    def step(self, input_ids: np.ndarray, encoder_mask: np.ndarray, cross: Sequence, past: Sequence | None):
        """One decoder step; returns `(logits [B, T, V] float32 on the host, presents)`."""
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

    def rows(self, values: Sequence, indices: np.ndarray) -> list:
        """Rows `indices` of every tensor, as new tensors (through the host on CUDA)."""
        return [self._device_value(value.numpy()[indices]) for value in values]

    def reorder(self, values: Sequence, indices: np.ndarray) -> list:
        """`rows`, for a cache that is not used afterwards: on the CPU a same-size reorder
        (beam search) happens in place, copying only the rows that move."""
        indices = np.asarray(indices)
        if reorder_outputs_in_place(values, indices, self.decoder.device_type):
            return list(values)
        return self.rows(values, indices)


class Seq2SeqStep:
    """The decoder as a step function over one encoded batch (see generate.py).

    `step(input_ids, attention_mask, cache)`: `attention_mask` is the decoder's, which
    generate.py grows each step; decoder inputs are never padded (every row starts with
    BOS), so only the encoder mask matters. The cache is `(past, row_sources)`; the
    cross-attention keys/values are expanded to one row per beam once, and copied again
    only when rows move between inputs (they never do in beam search).
    """

    def __init__(self, sessions: Seq2SeqSessions, input_ids: np.ndarray, attention_mask: np.ndarray):
        self.sessions = sessions
        self.source_mask = np.asarray(attention_mask, np.int64)
        self.source_cross = sessions.encode(input_ids, self.source_mask)
        # The cross tensors as the current rows need them: row i serves input `sources[i]`.
        self.sources = np.arange(len(input_ids))
        self.cross, self.encoder_mask = self.source_cross, self.source_mask

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache):
        past, sources = cache if cache is not None else (None, np.arange(len(input_ids)))
        if not np.array_equal(sources, self.sources):
            self.cross = self.sessions.rows(self.source_cross, sources)
            self.encoder_mask = self.source_mask[sources]
            self.sources = np.asarray(sources)
        logits, present = self.sessions.step(input_ids, self.encoder_mask, self.cross, past)
        return logits, (present, sources)

    def reorder(self, cache, indices: np.ndarray):
        past, sources = cache
        return self.sessions.reorder(past, indices), np.asarray(sources)[indices]

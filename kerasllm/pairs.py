"""Source/target pairs for sequence-to-sequence models: reading, checking, tf.data batches.

Pairs come from one TSV/CSV/JSONL file with named fields (`source`/`target` by
default) or from two parallel text files, read by `kerasllm.export.records` (the same
reader batch inference uses). Reading and checking need no TensorFlow; a bad record
is a `DataError` naming the file and line. `pair_batches` builds the tf.data pipeline
(imports TensorFlow when called).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from kerasllm.data import as_written, ragged_slices, without_autotune
from kerasllm.errors import DataError, UsageError
from kerasllm.export.records import read_parallel, read_records
from kerasllm.tokenizers import ENCODE_CHUNK, token_count


@dataclass
class Pair:
    """One training pair and where it came from (for error messages)."""

    source: str
    target: str
    path: str
    line: int
    target_path: str | None = None  # the target's file, where it is not `path` (parallel files)

    def where(self, side: str) -> str:
        return f"{(self.target_path or self.path) if side == 'target' else self.path}: line {self.line}"


def read_pairs(data: str | Path | None = None, source_file: str | Path | None = None,
               target_file: str | Path | None = None, source_field: str = "source", target_field: str = "target",
               fmt: str = "auto") -> list[Pair]:
    """All pairs of `data` (TSV/CSV/JSONL with named fields) or of `source_file` + `target_file`.

    Raises DataError naming the line for an unreadable record, a missing column, a
    ragged TSV row or an empty source or target.
    """
    if (data is None) == (source_file is None or target_file is None):
        raise UsageError("give either a data file (--data) or both --source-file and --target-file")
    if data is not None:
        if fmt == "text" or (fmt == "auto" and Path(str(data)).suffix.lower() not in
                             (".tsv", ".csv", ".jsonl", ".json", ".ndjson")):
            raise UsageError(f"{data}: pairs need a .tsv, .csv or .jsonl file (or --source-file/--target-file)")
        records, where, fields = read_records(data, fmt), str(data), (source_field, target_field)
    else:
        records, where, fields = read_parallel(source_file, target_file), f"{source_file}", ("source", "target")
    pairs = []
    for record in records:
        if data is None and record.error:  # read_parallel names the file in the error already
            file, _, problem = record.error.partition(": ")
            raise DataError(f"{file}: line {record.line}: {problem}")
        try:
            source, target = record.get(fields[0]), record.get(fields[1])
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        for name, value, side in ((fields[0], source, "source"), (fields[1], target, "target")):
            if not value.strip():
                label = target_file if (data is None and side == "target") else where
                raise DataError(f"{label}: line {record.line}: empty {side} ({name!r})")
        pairs.append(Pair(source, target, where, record.line, None if data is not None else str(target_file)))
    if not pairs:
        raise DataError(f"{where}: no pairs found")
    return pairs


def encode_pairs(pairs: Sequence[Pair], source_tokenizer, target_tokenizer, max_length: int):
    """Token ids of every pair: `(sources, targets)`, lists of int32 arrays.

    A source may use `max_length` positions; a target `max_length - 1` (the decoder
    reads BOS + target and predicts target + EOS). Longer pairs are a DataError naming
    the file and line, not silently truncated (nor tokenized whole: `encode_batch_bounded`).
    Encoded `ENCODE_CHUNK` pairs at a time, so only one chunk's ids are held as Python lists
    beside the arrays.
    """
    sources, targets = [], []
    for start in range(0, len(pairs), ENCODE_CHUNK):
        chunk = pairs[start:start + ENCODE_CHUNK]
        encoded = zip(chunk, source_tokenizer.encode_batch_bounded([p.source for p in chunk], max_length),
                      target_tokenizer.encode_batch_bounded([p.target for p in chunk], max_length - 1))
        for pair, (source, whole_source), (target, whole_target) in encoded:
            if len(source) > max_length:
                raise DataError(f"{pair.where('source')}: source is {token_count(source, whole_source, max_length)} "
                                f"tokens, longer than the model allows ({max_length})")
            if len(target) + 1 > max_length:
                raise DataError(f"{pair.where('target')}: target is {token_count(target, whole_target, max_length - 1)}"
                                f" tokens, longer than the model allows ({max_length - 1} plus EOS)")
            for side, ids in (("source", source), ("target", target)):
                if not ids:
                    raise DataError(f"{pair.where(side)}: {side} tokenizes to nothing")
            sources.append(np.asarray(source, np.int32))
            targets.append(np.asarray(target, np.int32))
    return sources, targets


def split_pairs(count: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation pairs: a fixed random split for a given seed."""
    if not 0.0 <= validation_fraction < 1.0:
        raise UsageError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    order = np.random.default_rng(seed).permutation(count)
    held = int(round(count * validation_fraction))
    if validation_fraction and held == 0:
        held = 1
    if count - held < 1:
        raise DataError(f"data: {count} pairs leave nothing to train on after the validation split")
    return np.sort(order[held:]), np.sort(order[:held])


def pair_batches(sources, targets, batch_size: int, *, pad_id: int, bos_id: int, eos_id: int,
                 bucket_width: int = 16, shuffle: bool = True, seed: int = 0, repeat: bool = True):
    """A `tf.data.Dataset` of `(inputs, labels)` batches for `Seq2SeqLM.fit`.

    `inputs` = {"encoder_token_ids" [B, S], "encoder_padding_mask" [B, S],
    "decoder_token_ids" [B, T] (BOS + target)}, `labels` [B, T] (target + EOS), padded
    with `pad_id` (which the loss ignores). Pairs of similar length are batched
    together (`bucket_by_sequence_length`) and padded to a multiple of `bucket_width`,
    so padding stays small and XLA compiles one step per bucket, not per batch shape.
    """
    import tensorflow as tf  # noqa: PLC0415

    dataset = tf.data.Dataset.zip(ragged_slices(sources), ragged_slices(targets))
    if shuffle:
        dataset = dataset.shuffle(len(sources), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()

    def teacher_forcing(src, tgt):
        return src, tf.concat([[bos_id], tgt], 0), tf.concat([tgt, [eos_id]], 0)

    dataset = dataset.map(as_written(teacher_forcing))
    longest = max(max(len(s) for s in sources), max(len(t) for t in targets) + 1)
    # pad_to_bucket_boundary pads to `boundary - 1`: boundaries k*w + 1 give lengths k*w.
    boundaries = [k * bucket_width + 1 for k in range(1, -(-longest // bucket_width) + 1)]
    dataset = dataset.bucket_by_sequence_length(
        element_length_func=as_written(lambda s, d, l: tf.maximum(tf.shape(s)[0], tf.shape(d)[0])),
        bucket_boundaries=boundaries, bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        padding_values=(pad_id, pad_id, pad_id), pad_to_bucket_boundary=True, drop_remainder=repeat,
    )

    def as_inputs(src, dec, labels):
        inputs = {"encoder_token_ids": src, "encoder_padding_mask": tf.cast(tf.not_equal(src, pad_id), tf.int32),
                  "decoder_token_ids": dec}
        return inputs, labels

    # No autotuning (see kerasllm.data.without_autotune): the maps are cheap, two batches prefetched.
    return without_autotune(dataset.map(as_written(as_inputs)).prefetch(2))

"""Input pipelines for the encoder tasks: labelled rows, tagged sentences and masked-LM sequences.

Reading (TSV/CSV with a header row, JSONL with named fields, plain text one record per
line, CoNLL-style columns for tagged sentences) goes through
`kerasllm.export.records.read_records`, the same streaming reader batch inference uses;
here a bad record is a `DataError` naming the file and line.
Everything above the `tf.data` section imports no TensorFlow (the ONNX-side
`kerasllm evaluate` uses it too).

Sequences are `[BOS] + ids` (BOS doubles as the CLS token), right-padded with PAD.
Batches are bucketed by length (padded to 16, 32, 64, ... up to the longest allowed
length), so little padding is computed and XLA sees only a few shapes.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from kerasllm.data import as_written, ragged_slices, without_autotune
from kerasllm.errors import DataError, UsageError
from kerasllm.export.records import CONLL_FIELDS, detect_format, read_records

MASK_RATE = 0.15


# -- reading records ----------------------------------------------------------------------------
@dataclass
class Row:
    """One usable record: where it came from (for error messages) and its fields."""

    where: str  # "path: line N"
    text: str
    label: str | None = None


def read_rows(paths: str | Path | Sequence[str | Path], text_field: str = "text", label_field: str | None = None,
              fmt: str = "auto") -> list[Row]:
    """Read every record of `paths`; a bad record, missing field or empty text is a DataError naming its line.

    A directory stands for the text files under it (one record per line; see `kerasllm.data`).
    """
    return list(iter_rows(paths, text_field, label_field, fmt))


def iter_rows(paths: str | Path | Sequence[str | Path], text_field: str = "text", label_field: str | None = None,
              fmt: str = "auto") -> Iterator[Row]:
    """`read_rows`, record by record (`kerasllm evaluate` holds a window of them at a time)."""
    from kerasllm.data import resolve_text_files  # noqa: PLC0415 - TF-free

    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [f for p in paths for f in (resolve_text_files(p) if Path(p).is_dir() else [Path(p)])]
    count = 0
    for path in paths:
        # (a TSV/CSV header without the text column: a UsageError, as in the batch commands)
        for record in read_records(path, fmt=fmt, text_field=text_field):
            where = f"{path}: line {record.line}"
            try:
                text = record.get(text_field)
                label = record.get(label_field).strip() if label_field else None
            except DataError as err:
                raise DataError(f"{path}: {err}") from None
            if not text.strip():
                raise DataError(f"{where}: empty {text_field!r} field")
            if label_field and not label:
                raise DataError(f"{where}: empty {label_field!r} field")
            count += 1
            yield Row(where, text, label)
    if not count:
        raise DataError(f"{', '.join(map(str, paths))}: no records")


@dataclass
class TaggedRow:
    """One tagged sentence: where it came from (for error messages), its words and their tags."""

    where: str  # "path: line N"
    words: list[str]
    tags: list[str]


TAGGED_FORMATS = ("jsonl", "conll")


def read_tagged(paths: str | Path | Sequence[str | Path], tokens_field: str = "tokens", tags_field: str = "tags",
                fmt: str = "auto") -> list[TaggedRow]:
    """Read every tagged sentence of `paths` (JSONL with list fields, or CoNLL columns: see
    `kerasllm.export.records`); DataError naming the file and line for a record that cannot be
    read, a missing field, a field that is not a list of strings, an empty sentence, a blank word
    or tag, or words and tags of different lengths. CoNLL records' fields are always
    `tokens` and `tags`: the field names apply to JSONL.
    """
    return list(iter_tagged(paths, tokens_field, tags_field, fmt))


def iter_tagged(paths: str | Path | Sequence[str | Path], tokens_field: str = "tokens", tags_field: str = "tags",
                fmt: str = "auto") -> Iterator[TaggedRow]:
    """`read_tagged`, sentence by sentence (`kerasllm evaluate` holds a window of them at a time)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    count = 0
    for path in paths:
        kind = detect_format(path, fmt)
        if kind not in TAGGED_FORMATS:
            raise UsageError(f"{path}: tagged sentences are read from JSONL (.jsonl) or CoNLL (.conll) files, "
                             f"not {kind} (name the format with --format jsonl or --format conll)")
        fields = CONLL_FIELDS if kind == "conll" else (tokens_field, tags_field)
        for record in read_records(path, fmt=kind):
            where = f"{path}: line {record.line}"
            try:
                words, tags = record.words(fields[0]), record.words(fields[1], numbers=True)
            except DataError as err:
                raise DataError(f"{path}: {err}") from None
            if not words:
                raise DataError(f"{where}: empty sentence (no words)")
            if len(words) != len(tags):
                raise DataError(f"{where}: {len(words)} words but {len(tags)} tags")
            blank = next((i for i, (w, t) in enumerate(zip(words, tags)) if not w.strip() or not t.strip()), None)
            if blank is not None:
                raise DataError(f"{where}: word {blank + 1} has a blank word or tag ({words[blank]!r}, {tags[blank]!r})")
            count += 1
            yield TaggedRow(where, words, [tag.strip() for tag in tags])
    if not count:
        raise DataError(f"{', '.join(map(str, paths))}: no records")


def encode_tagged(tokenizer, rows: Sequence[TaggedRow], tags: "LabelMap", max_length: int):
    """`(sequences, labels)`: `[BOS] + pieces` of each sentence and its per-position tag ids (-1 where
    none), aligned by `kerasllm.export.word_pieces` as at inference; a sentence longer than
    `max_length` keeps its start (as the classifier's texts). DataError naming the line for an
    unknown tag or a word without tokens. The words of `ENCODE_CHUNK` sentences are encoded per
    call, so the tokenizer's per-word Encodings are held for one chunk, not the whole corpus."""
    from kerasllm.export.word_pieces import join_words  # noqa: PLC0415
    from kerasllm.tokenizers import ENCODE_CHUNK  # noqa: PLC0415

    sequences, labels = [], []
    for first in range(0, len(rows), ENCODE_CHUNK):
        chunk = rows[first:first + ENCODE_CHUNK]
        encoded, start = _encoded_words(tokenizer, chunk), 0
        for row in chunk:
            pieces = join_words(encoded[start:start + len(row.words)], row.words, tokenizer.bos_id)
            start += len(row.words)
            tag_ids = [tags.id(tag, row.where, what="tag") for tag in row.tags]
            sequences.append(list(pieces[:max_length]))
            labels.append(pieces.labels(tag_ids)[:max_length])
    return sequences, labels


def _encoded_words(tokenizer, rows: Sequence[TaggedRow]):
    """`word_pieces.encode_words` of all the words of `rows` in one call; DataError naming the
    sentence of a word without tokens (found sentence by sentence, only then)."""
    from kerasllm.export.word_pieces import AlignmentError, encode_words  # noqa: PLC0415

    try:
        return encode_words(tokenizer, [word for row in rows for word in row.words])
    except AlignmentError:
        for row in rows:
            try:
                encode_words(tokenizer, row.words)
            except AlignmentError as err:
                raise DataError(f"{row.where}: {err}") from None
        raise


# A number as JSON, CSV writers and pandas spell one (NaN and infinities included; not Python's
# "1_000" or a number with spaces around it, which are names).
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)


def _label_number(label: str) -> Decimal | None:
    """The exact value of a label written as a number, else None (a name)."""
    return Decimal(label) if _NUMBER.fullmatch(label) else None


def _spelling_key(label: str) -> tuple:
    """What a label means, whichever way it is written (`LabelMap.id`): its number, truth value or NFC text."""
    number = _label_number(label.strip())
    if number is not None and not number.is_nan():
        return ("number", number)  # Decimal("1") == Decimal("1.0"), hashed alike
    if label.strip().lower() in ("true", "false"):
        return ("truth", label.strip().lower())
    return ("text", unicodedata.normalize("NFC", label))


class LabelMap:
    """Label names <-> ids 0..L-1, saved in config.json as `"labels": [...]`.

    Labels given as numbers ("0", "1", "2") keep their numeric order; names are sorted,
    so the same data always gives the same ids.

    Example:
    >>> LabelMap.from_labels(["pos", "neg", "pos"]).labels
    ['neg', 'pos']
    """

    def __init__(self, labels: Sequence[str]):
        self.labels = [str(label) for label in labels]
        self.index = {label: i for i, label in enumerate(self.labels)}
        # A label looked up in another spelling of the model's is that label: another Unicode normalization
        # (NFD "négatif", as macOS file names and some input methods write it, against the model's NFC one),
        # another spelling of its number ("1" against "1.0": pandas writes a column that held a NaN so) or
        # of its truth value ("True" / "true": pandas' CSV / JSON). Each had been "unknown label". Only
        # spellings that name one label of the model's are kept.
        same: dict[tuple, list[int]] = {}
        for i, label in enumerate(self.labels):
            same.setdefault(_spelling_key(label), []).append(i)
        self.same = {key: ids[0] for key, ids in same.items() if len(ids) == 1}

    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> "LabelMap":
        unique = set(labels)
        numbers = {label: _label_number(label) for label in unique}
        if any(number is None for number in numbers.values()):
            # One name in two Unicode normalizations (NFC "n\xe9gatif", NFD "ne\u0301gatif": they look the same)
            # had become two classes, each with half the examples, and two `scores` keys that look alike.
            forms: dict[str, list[str]] = {}
            for label in unique:
                forms.setdefault(unicodedata.normalize("NFC", label), []).append(label)
            for same in forms.values():
                if len(same) > 1:
                    shown = " and ".join(ascii(label) for label in sorted(same))
                    raise DataError(f"data: labels {shown} are the same text in two Unicode normalizations (NFC, "
                                    "NFD): write each label one way")
            ordered = sorted(unique)
        else:
            # One number written two ways ("1" and "1.0", as pandas writes a column that held a NaN)
            # had become two classes, their order left to the set's (string-hash) order. Compared
            # exactly: as floats, ids past 2**53 ("9007199254740993") had matched their neighbours.
            spellings: dict[Decimal, list[str]] = {}
            for label, number in numbers.items():
                spellings.setdefault(number, []).append(label)
            for same in spellings.values():
                if len(same) > 1:
                    shown = " and ".join(repr(label) for label in sorted(same))
                    raise DataError(f"data: labels {shown} are the same number written differently: write each "
                                    "label one way")
            # Among numbers, `nan` is how str(float), NumPy and older pandas write a missing value: it had
            # become a class of its own. (Among names it is one: ISO 639-3's code for Min Nan.)
            missing = sorted(label for label, number in numbers.items() if number.is_nan())
            if missing:
                raise DataError(f"data: label {missing[0]!r} among numeric labels is a missing value (NumPy's and "
                                "pandas' spelling of an empty cell): give those rows a label or leave them out")
            ordered = sorted(unique, key=lambda label: (numbers[label], label))  # (the spelling: a total order)
        if len(ordered) < 2:
            raise DataError(f"data: need at least 2 different labels, found {ordered}")
        return cls(ordered)

    def __len__(self) -> int:
        return len(self.labels)

    def id(self, label: str, where: str = "", what: str = "label") -> int:
        if label not in self.index:
            same = self.same.get(_spelling_key(label))
            if same is not None:
                return same
            shown = ", ".join(self.labels[:20]) + (", ..." if len(self.labels) > 20 else "")
            raise DataError(f"{where + ': ' if where else ''}unknown {what} {label!r} (known: {shown})")
        return self.index[label]

    def ids(self, rows: Sequence[Row]) -> np.ndarray:
        return np.asarray([self.id(row.label, row.where) for row in rows], dtype=np.int32)


def encode_rows(tokenizer, rows: Sequence[Row], max_length: int) -> list[list[int]]:
    """`[BOS] + ids` per row, cut to `max_length` tokens (a classifier reads the start of a text;
    a long one is not tokenized whole, `TextTokenizer.encode_batch_bounded`)."""
    encoded = tokenizer.encode_batch_bounded([row.text for row in rows], max_length - 1)
    return [[tokenizer.bos_id] + ids[:max_length - 1] for ids, _ in encoded]


def encode_chunks(tokenizer, rows: Sequence[Row], max_length: int) -> list[list[int]]:
    """`[BOS] + ids` sequences for masked-LM pretraining; long texts become several chunks."""
    size = max_length - 1
    sequences = []
    for ids in tokenizer.encode_batch([row.text for row in rows]):
        for start in range(0, max(len(ids), 1), size):
            sequences.append([tokenizer.bos_id] + ids[start:start + size])
    return sequences


def split_validation(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """Shuffle (seeded) and hold out the last `fraction` for validation."""
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"validation fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(items))
    cut = len(items) - int(round(len(items) * fraction))
    if cut < 1:
        raise DataError(f"data: {len(items)} records leave none for training")
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]


def mask_for_evaluation(sequences: Sequence[Sequence[int]], vocab_size: int, mask_id: int,
                        unselectable: Sequence[int], seed: int = 0, rate: float = MASK_RATE):
    """BERT masking (80% MASK, 10% random, 10% kept) in numpy with a fixed seed.

    Written in numpy (training masks in tf.data with `bert_masking`)
    because evaluation must also run on an ONNX bundle without TensorFlow, and the
    fixed seed makes perplexities comparable between a model dir and its bundle.
    Returns `(masked sequences, [(row, position, original id), ...])`.
    """
    rng = np.random.default_rng(seed)
    blocked = set(unselectable)
    masked, targets = [], []
    for row, seq in enumerate(sequences):
        seq = list(seq)
        candidates = [i for i, t in enumerate(seq) if t not in blocked]
        count = min(len(candidates), max(1, int(round(rate * len(candidates))))) if candidates else 0
        for pos in sorted(rng.choice(candidates, size=count, replace=False)) if count else []:
            targets.append((row, int(pos), seq[pos]))
            roll = rng.random()
            if roll < 0.8:
                seq[pos] = mask_id
            elif roll < 0.9:
                seq[pos] = int(rng.integers(0, vocab_size))
        masked.append(seq)
    return masked, targets


# -- tf.data ------------------------------------------------------------------------------------
def bucket_boundaries(max_length: int) -> list[int]:
    """Padded lengths 16, 32, 64, ... capped at `max_length` (each batch pads to one of them)."""
    sizes, size = [], 16
    while size < max_length:
        sizes.append(size)
        size *= 2
    return sizes + [max_length]


def _check_lengths(sequences: Sequence[Sequence[int]], max_length: int) -> None:
    """DataError naming the longest sequence if it is longer than `max_length` (bucketing would
    otherwise fail at iteration, in a tf.data assertion that names neither). The recipes cut their
    sequences to `--seq-len` first (`encode_rows`, `encode_tagged`, `encode_chunks`)."""
    lengths = [len(s) for s in sequences]
    longest = max(range(len(lengths)), key=lengths.__getitem__, default=None)
    if longest is not None and lengths[longest] > max_length:
        raise DataError(f"data: sequence {longest} has {lengths[longest]} tokens, more than the maximum length "
                        f"{max_length} (cut sequences to it first)")


def _bucketed(dataset, max_length: int, batch_size: int, padding_values):
    import tensorflow as tf  # noqa: PLC0415

    # `ragged_slices`' rows are ragged tensors of ragged rank 0, which bucketing cannot pad; a map
    # hands them on as plain tensors. Here, after any shuffle: its buffer then fills without a map.
    dataset = dataset.map(as_written(lambda *row: row if len(row) > 1 else row[0]))
    sizes = bucket_boundaries(max_length)
    # A sequence of length n goes to the first bucket whose boundary exceeds n and is
    # padded to boundary - 1; hence boundaries of size + 1.
    return dataset.bucket_by_sequence_length(
        element_length_func=as_written(lambda x, *rest: tf.shape(x)[0]),
        bucket_boundaries=[s + 1 for s in sizes], bucket_batch_sizes=[batch_size] * (len(sizes) + 1),
        padding_values=padding_values, pad_to_bucket_boundary=True,
    )


def classification_dataset(sequences: Sequence[Sequence[int]], labels: np.ndarray, batch_size: int, pad_id: int,
                           max_length: int, shuffle: bool = True, seed: int = 0, repeat: bool = True):
    """`({"token_ids", "padding_mask"}, label)` batches, bucketed by length."""
    import tensorflow as tf  # noqa: PLC0415

    _check_lengths(sequences, max_length)

    dataset = tf.data.Dataset.zip(ragged_slices(sequences),
                                  tf.data.Dataset.from_tensor_slices(np.asarray(labels, np.int32)))
    if shuffle:
        dataset = dataset.shuffle(len(sequences), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = _bucketed(dataset, max_length, batch_size, (tf.constant(pad_id, tf.int32), tf.constant(0, tf.int32)))
    dataset = dataset.map(as_written(lambda x, y: ({"token_ids": x, "padding_mask": tf.not_equal(x, pad_id)}, y)))
    return without_autotune(dataset.prefetch(2))


def token_classification_dataset(sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                                 batch_size: int, pad_id: int, max_length: int, shuffle: bool = True, seed: int = 0,
                                 repeat: bool = True):
    """`({"token_ids", "padding_mask"}, per-position labels)` batches, bucketed by length; the labels
    of padding are -1, as those of BOS, separators and continuation pieces (ignored by the loss)."""
    import tensorflow as tf  # noqa: PLC0415

    _check_lengths(sequences, max_length)

    dataset = tf.data.Dataset.zip(ragged_slices(sequences), ragged_slices(labels))
    if shuffle:
        dataset = dataset.shuffle(len(sequences), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = _bucketed(dataset, max_length, batch_size, (tf.constant(pad_id, tf.int32), tf.constant(-1, tf.int32)))
    dataset = dataset.map(as_written(lambda x, y: ({"token_ids": x, "padding_mask": tf.not_equal(x, pad_id)}, y)))
    return without_autotune(dataset.prefetch(2))


def mask_selection_length(max_length: int, rate: float = MASK_RATE) -> int:
    """Most masked positions per sequence (`bert_masking` picks max(1, round(rate * n)) of n tokens)."""
    return max(1, math.ceil(rate * max_length) + 1)


def masked_lm_dataset(sequences: Sequence[Sequence[int]], batch_size: int, vocab_size: int, special_ids: dict,
                      max_length: int, shuffle: bool = True, seed: int = 0, repeat: bool = True):
    """Masked-LM batches `(inputs, targets, sample_weights)`, masked anew every time (dynamic masking).

    `bert_masking` selects 15% of the real tokens (never PAD, BOS, EOS or SEP), replaces
    80% of them by MASK, 10% by a random id and keeps 10%, with stateless random ops seeded
    per batch from `seed` (`Dataset.random`, re-drawn on each pass over a finite dataset):
    the same seed gives the same batches, masks included.
    inputs: `{"token_ids", "padding_mask", "mask_positions"}`; targets: the original ids
    at `mask_positions`; sample weights: 1 for real selections, 0 for their padding.
    """
    import tensorflow as tf  # noqa: PLC0415

    _check_lengths(sequences, max_length)
    pad_id = special_ids["pad"]
    unselectable = sorted({pad_id, special_ids["bos"], special_ids["eos"], special_ids["sep"]})
    selection_length = mask_selection_length(max_length)
    dataset = ragged_slices(sequences)
    if shuffle:
        dataset = dataset.shuffle(len(sequences), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = _bucketed(dataset, max_length, batch_size, tf.constant(pad_id, tf.int32))
    # One stateless seed [2] per batch; in step with the batches, so parallel maps stay deterministic.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def mask(token_ids, batch_seed):
        masked, positions, ids, weights = bert_masking(token_ids, batch_seed, vocab_size, special_ids["mask"],
                                                       unselectable, selection_length)
        # padding_mask from the ids before masking: a random replacement may be the PAD id.
        inputs = {"token_ids": masked, "padding_mask": tf.not_equal(token_ids, pad_id), "mask_positions": positions}
        return inputs, ids, weights

    # Fixed parallelism, no autotuning: see kerasllm.data.without_autotune.
    dataset = tf.data.Dataset.zip(dataset, seeds)
    return without_autotune(dataset.map(as_written(mask), num_parallel_calls=2).prefetch(2))


def bert_masking(token_ids, seed, vocab_size: int, mask_id: int, unselectable: Sequence[int], selection_length: int,
                 rate: float = MASK_RATE, mask_token_rate: float = 0.8, random_token_rate: float = 0.1):
    """BERT masking of a batch `token_ids [B, T]` (int32) by stateless random ops from `seed` (int64 `[2]`).

    Written here rather than taken from keras-hub because its `MaskedLMMaskGenerator` (tf-text's
    `mask_language_model`) takes no seed, so `masked_lm_dataset(seed=...)` could not repeat its masks.
    The same rule but for the count, BERT's (tf-text's selector takes `ceil(rate * n)`):
    in each row `max(1, round(rate * n))` (at most `selection_length`) of the `n` tokens not in
    `unselectable` are chosen, uniformly; of those `mask_token_rate` become `mask_id`,
    `random_token_rate` a uniform random id below `vocab_size` and the rest stay.
    Returns `(masked ids [B, T], positions [B, L] ascending, original ids [B, L], weights [B, L]
    float32)`, the last three padded with 0 to `L = selection_length`.
    """
    import tensorflow as tf  # noqa: PLC0415

    select_seed, value_seed, random_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = tf.shape(token_ids)
    rows, length = shape[0], shape[1]
    selectable = tf.reduce_all(token_ids[:, :, None] != tf.constant(unselectable, tf.int32)[None, None, :], axis=-1)
    # BERT's count, as `mask_for_evaluation`'s: round(rate * n), at least one of n > 0 tokens (the
    # ceiling, tf-text's selector's rule, had masked 16.5% where 15% was documented).
    # In float64, as Python's round in mask_for_evaluation: 0.15 in float32 is 0.15000001, which
    # rounds 0.15 * 190 = 28.4999... up to 29.
    selectable_count = tf.reduce_sum(tf.cast(selectable, tf.float64), axis=1)
    count = tf.minimum(tf.maximum(tf.round(tf.constant(rate, tf.float64) * selectable_count), 1.0), selectable_count)
    count = tf.minimum(tf.cast(count, tf.int32), selection_length)
    # A uniformly random subset: the `count` selectable positions of highest random score.
    scores = tf.where(selectable, tf.random.stateless_uniform(shape, select_seed), -1.0)
    top = tf.math.top_k(scores, k=tf.minimum(selection_length, length), sorted=True).indices
    chosen = tf.range(tf.shape(top)[1])[None, :] < count[:, None]
    positions = tf.sort(tf.where(chosen, top, length), axis=1)  # ascending, the unchosen (= length) last
    positions = tf.pad(positions, [[0, 0], [0, selection_length - tf.shape(positions)[1]]], constant_values=length)
    valid = positions < length
    positions = tf.where(valid, positions, 0)
    positions.set_shape([None, selection_length])
    valid.set_shape([None, selection_length])
    original = tf.where(valid, tf.gather(token_ids, positions, batch_dims=1), 0)
    roll = tf.random.stateless_uniform(tf.shape(positions), value_seed)
    random_ids = tf.random.stateless_uniform(tf.shape(positions), random_seed, maxval=vocab_size, dtype=tf.int32)
    values = tf.where(roll < mask_token_rate, mask_id,
                      tf.where(roll < mask_token_rate + random_token_rate, random_ids, original))
    where = tf.stack([tf.broadcast_to(tf.range(rows)[:, None], tf.shape(positions)), positions], axis=-1)
    masked = tf.tensor_scatter_nd_update(token_ids, tf.boolean_mask(where, valid), tf.boolean_mask(values, valid))
    return masked, positions, original, tf.cast(valid, tf.float32)


def iter_batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]

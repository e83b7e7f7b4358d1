"""Input pipelines: text files -> token ids -> tf.data training windows.

Reading and validating files needs no TensorFlow; the `tf.data` builders import it
when called. Errors name the file (and line) at fault.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from kerasllm.errors import DataError, UsageError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


def resolve_text_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files and directories (recursively, text suffixes only) into a sorted file list.

    Files found in a directory that hold no text (empty or only whitespace) are left out, as the
    record readers skip their blank lines; a directory without any text is a DataError, and a file
    named itself stays in the list (`text_blocks` refuses it if empty).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            # Compressed shards (part-001.txt.gz) had been left out without a word: half a corpus, once.
            compressed = next((p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in
                               COMPRESSED_SUFFIXES and Path(p.stem).suffix.lower() in TEXT_SUFFIXES), None)
            if compressed is not None:
                raise DataError(f"data: {compressed}: a compressed text file; kerasllm reads UTF-8 text: "
                                f"decompress the directory's files first")
            if not found:
                raise DataError(f"data: {path}: directory holds no text files ({', '.join(TEXT_SUFFIXES)})")
            with_text = [p for p in found if not is_blank(p)]
            if not with_text:
                raise DataError(f"data: {path}: directory holds no text (its {len(found)} text "
                                f"file{'s are' if len(found) > 1 else ' is'} empty)")
            files.extend(with_text)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data: {path}: no such file or directory")
    if not files:
        raise DataError("data: no input files given")
    return files


def is_blank(path: Path) -> bool:
    """Whether the file holds no text: empty, or only whitespace as `text_blocks` reads it (read up to
    its first other character; a byte that is not UTF-8 counts as text, for `text_blocks` to report).
    A byte order mark opening the file is not text, as `text_blocks` drops it ("utf-8-sig")."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    with open(path, "rb") as file:
        while chunk := file.read(1 << 16):
            text = decoder.decode(chunk)
            if text and not text.isspace():
                return False
    text = decoder.decode(b"", final=True)
    return not text or text.isspace()


# Bytes read at a time by `text_blocks`: the memory a streamed file costs, whatever its size.
BLOCK_BYTES = 16 << 20
# A block ends before a space that follows a printable ASCII character where it can: there the
# char, byte, byte-level BPE and unigram (Metaspace) tokenizers all split words the same in the block
# as in the whole file (see `text_blocks`).
_CLEAN_CUT = re.compile(rb"[\x21-\x7e](?= )")


def utf8_error(path: Path, raw: bytes, start: int, line: int, column: int) -> DataError:
    """The error for the bad byte `raw[start]`; `raw` begins at `line`, `column` of the file."""
    line += raw.count(b"\n", 0, start)
    last_newline = raw.rfind(b"\n", 0, start)
    column = start - last_newline if last_newline >= 0 else column + start
    return DataError(f"data: {path}: line {line}, column {column}: not valid UTF-8 (byte 0x{raw[start]:02x})")


def text_blocks(path: Path, block_bytes: int | None = None) -> Iterator[str]:
    """The text of one file in blocks of about `block_bytes` (`BLOCK_BYTES`), strict UTF-8.

    Memory stays bounded for a file of any size. A block is cut before a space that follows a
    printable ASCII character where its last half has one, else after its last newline in its last
    half, else (no newline for half a block) before its last whole character. At the first kind
    of cut every tokenizer kind gives the same ids for the blocks as for the whole file: GPT-2's
    pre-tokenizer (byte-level BPE) ends a word there either way, and unigram's Metaspace starts
    the next word with its marker there either way (the other cuts may change a token or two).
    Errors name the file and a bad byte's line and column, or say that the file is empty (all blank).
    A UTF-8 byte order mark at the start is skipped, as the record readers skip it (export/records.py),
    and a file that is not UTF-8 text as a whole (compressed, UTF-16: `records.not_text`) is refused.
    Line ends are read as Python's text mode reads them: CRLF and a carriage return alone are a line
    feed (a CRLF corpus had trained its `\r` as a token, where every record reader drops it).
    """
    from kerasllm.export.records import not_text  # noqa: PLC0415 - TF-free

    block_bytes = block_bytes or BLOCK_BYTES
    line, column = 1, 1  # where the next block starts in the file
    has_text, carry = False, b""
    with open(path, "rb") as file:
        head = file.read(64)
        if head.startswith(codecs.BOM_UTF8):  # a leading BOM (Excel, Notepad) is not text
            file.seek(len(codecs.BOM_UTF8))
        elif reason := not_text(head):
            raise DataError(f"data: {path}: {reason}")
        else:
            file.seek(0)
        while True:
            chunk = file.read(block_bytes)
            data = carry + chunk if carry else chunk
            if not data:
                break
            cut = _block_cut(data) if chunk else len(data)
            if chunk and cut > 1 and data[cut - 1] == 0x0D:  # a CRLF is never cut in two (read as two line ends)
                cut -= 1
            block, carry = data[:cut], data[cut:]
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as err:
                raise utf8_error(path, block, err.start, line, column) from None
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            has_text = has_text or not text.isspace()
            last_newline = block.rfind(b"\n")
            line += block.count(b"\n")
            column = len(block) - last_newline if last_newline >= 0 else column + len(block)
            yield text
    if not has_text:
        raise DataError(f"data: {path}: file is empty")


def _block_cut(data: bytes) -> int:
    """Where `text_blocks` cuts `data` (more of the file follows): see its docstring."""
    half = len(data) // 2
    for window in (1 << 12, 1 << 16, half):  # the last clean cut, looked for near the end first
        last = None
        for last in _CLEAN_CUT.finditer(data, max(half, len(data) - window)):
            pass
        if last is not None:
            return last.end()
    newline = data.rfind(b"\n")
    if newline >= half:  # (an earlier one would leave more than half a block to carry over)
        return newline + 1
    # One line longer than the block: cut before the last character's first byte (not 10xxxxxx).
    for start in range(len(data) - 1, max(len(data) - 5, 0), -1):
        if data[start] & 0xC0 != 0x80:
            return start
    return len(data)


def read_corpus(paths) -> list[str]:
    """All documents (one per file) of a corpus, read as `text_blocks` reads them; refuses empty files."""
    return ["".join(text_blocks(path)) for path in resolve_text_files(paths)]


def tokenize_corpus(texts: Iterable[str], tokenizer, eos_between_documents: bool = True) -> np.ndarray:
    """One flat int32 array of ids; documents are separated by EOS, as GPT-2 does."""
    pieces = []
    for text in texts:
        pieces.append(tokenizer.encode_array(text))
        if eos_between_documents:
            pieces.append(np.asarray([tokenizer.eos_id], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


@dataclass
class TokenSplit:
    """Token ids split into training and validation parts (the last fraction is validation)."""

    train: np.ndarray
    validation: np.ndarray

    @classmethod
    def from_ids(cls, ids: np.ndarray, validation_fraction: float, seq_len: int) -> "TokenSplit":
        cls.check_fraction(validation_fraction)
        cut = int(len(ids) * (1.0 - validation_fraction))
        return cls(ids[:cut], ids[cut:]).checked(validation_fraction, seq_len)

    @staticmethod
    def check_fraction(validation_fraction: float) -> None:
        if not 0.0 <= validation_fraction < 1.0:
            raise UsageError(f"validation fraction must be in [0, 1), got {validation_fraction}")

    def checked(self, validation_fraction: float, seq_len: int) -> "TokenSplit":
        """This split, if each part fills a window of `seq_len` (a DataError otherwise)."""
        if len(self.train) < seq_len + 1:
            raise DataError(
                f"data: only {len(self.train)} training tokens, fewer than one window of --seq-len {seq_len}"
            )
        if validation_fraction and len(self.validation) < seq_len + 1:
            raise DataError(
                f"data: only {len(self.validation)} validation tokens for --seq-len {seq_len}; "
                "add text, raise --validation-fraction, lower --seq-len, or validate on none (--validation-fraction 0)"
            )
        return self


# Up to this many ids, `lm_windows` gathers windows from a `tf.constant` copy of them (256 MB of int32);
# beyond it, from the ids where they lie (the token cache's memory map). A module constant for tests.
# Steady step time, 4-layer 128-wide char GPT, batch 12 x 64, XLA, 2 cores, alternating rounds of 300
# steps in one process: over 270M cached tokens 25.6 ms (tf.constant) vs 26.1 ms (np.memmap), rounds
# spreading 24.1-27.8 ms on both; over tinyshakespeare's 1M 28.3 vs 27.2 ms (the threshold forced down).
IN_MEMORY_TOKENS = 1 << 26


def shard_seed(seed: int, shard_index: int, num_shards: int) -> int:
    """A seed of its own for each input shard (worker); the plain seed with one shard."""
    if num_shards <= 1:
        return seed
    return int(np.random.SeedSequence([seed, shard_index, num_shards]).generate_state(1)[0])


def lm_windows(ids: np.ndarray, seq_len: int, batch_size: int, mode: str = "random", seed: int = 0,
               repeat: bool = True, shard_index: int = 0, num_shards: int = 1):
    """A `tf.data.Dataset` of `(inputs [B, T], targets [B, T])` next-token windows.

    `mode="random"`: windows at uniformly random offsets, as nanoGPT samples them
    (infinite; the model sees every region with equal probability).
    `mode="packed"`: the ids cut into consecutive non-overlapping windows, shuffled
    each epoch, each seen once per epoch (at most once with `repeat=False`: below).

    `repeat=False` gives one pass: in random mode about as many windows as packed mode cuts, in
    packed mode each window at most once. Every batch has `batch_size` rows (one batch shape, so XLA
    compiles the step once), so a pass leaves out its last `windows % batch_size` windows (in
    packed mode, a different few each pass, as the order is reshuffled). Data of fewer windows
    than one batch is a DataError: it would yield no batch at all, and `evaluate` return [].

    With `num_shards > 1` (one shard per worker, see `Distribution.distribute`) the
    shards split the data: in packed mode shard `i` owns windows `i, i + n, i + 2n, ...`
    (the same number for every shard, so the workers' epochs stay in step; at most
    `n - 1` trailing windows sit out), so within an epoch no window is read twice or
    skipped; in random mode each shard draws from its own seed (`shard_seed`).
    `batch_size` is then the shard's (per-replica) batch.

    `ids` of up to `IN_MEMORY_TOKENS` tokens are copied into one `tf.constant` and the windows
    gathered from it in the graph; longer ones (an `np.memmap` of the token cache) stay on disk and
    each batch's windows are read from them by `memmap_windows`. Both read the same windows for
    the same seed: only where the tokens come from differs.
    """
    import tensorflow as tf  # noqa: PLC0415

    if mode not in ("random", "packed"):
        raise UsageError(f"window mode must be 'random' or 'packed', got {mode!r}")
    if len(ids) < seq_len + 1:  # one window: seq_len inputs and the target after the last
        raise DataError(f"data: {len(ids)} tokens cannot fill one window of {seq_len} + 1")
    if len(ids) <= IN_MEMORY_TOKENS:
        table = tf.constant(np.asarray(ids, dtype=np.int32))
        span = tf.range(seq_len + 1, dtype=tf.int64)
        windows_at = as_written(lambda o: tf.gather(table, o[:, None] + span[None, :]))
    else:
        windows_at = memmap_windows(ids, seq_len, batch_size)

    def split(windows):
        return windows[:, :-1], windows[:, 1:]

    if not 0 <= shard_index < num_shards:
        raise UsageError(f"shard index {shard_index} is out of range for {num_shards} shards")
    seed = shard_seed(seed, shard_index, num_shards)
    if mode == "random":
        # Offsets 0 .. len - seq_len - 1 inclusive (nanoGPT's torch.randint(len - block_size)): the last
        # window's last target is the corpus's last token.
        limit = len(ids) - seq_len
        offsets = tf.data.Dataset.random(seed=seed).map(as_written(lambda r: tf.math.floormod(r, limit)))
        if not repeat:
            windows = max((limit - 1) // seq_len, 1)
            _check_one_batch(windows, seq_len, batch_size, num_shards)
            offsets = offsets.take(windows)
        dataset = offsets.batch(batch_size, drop_remainder=True).map(windows_at)
    else:
        count = (len(ids) - 1) // seq_len
        if count < num_shards:
            raise DataError(f"data: {count} windows of {seq_len} + 1 tokens cannot feed {num_shards} workers")
        starts = np.arange(count, dtype=np.int64) * seq_len
        starts = starts[shard_index::num_shards][: count // num_shards]
        count = len(starts)
        dataset = tf.data.Dataset.from_tensor_slices(starts)
        dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)
        if repeat:  # batches run on across the epochs' boundaries: every window is seen
            dataset = dataset.repeat()
        else:
            _check_one_batch(count, seq_len, batch_size, num_shards)
        dataset = dataset.batch(batch_size, drop_remainder=True).map(windows_at)
    return without_autotune(dataset.map(as_written(split)).prefetch(2))


def _check_one_batch(windows: int, seq_len: int, batch_size: int, num_shards: int) -> None:
    """One pass of `lm_windows` (`repeat=False`) drops a short last batch: fewer windows than one
    batch would give an empty dataset (no validation loss, an `evaluate` of [])."""
    if windows < batch_size:
        shard = " per shard" if num_shards > 1 else ""
        raise DataError(f"data: {windows} windows of {seq_len} + 1 tokens{shard} cannot fill one batch of "
                        f"{batch_size} (with repeat=False each batch is full; a short last one is dropped)")


def memmap_windows(ids: np.ndarray, seq_len: int, batch_size: int):
    """A `Dataset.map` function from a batch of window offsets `[B]` to the windows `[B, T + 1]`,
    read from `ids` (an `np.memmap`: only the pages the windows touch are read) by numpy in a
    `tf.numpy_function`; `lm_windows` uses it for more than `IN_MEMORY_TOKENS` ids."""
    import tensorflow as tf  # noqa: PLC0415

    span = np.arange(seq_len + 1, dtype=np.int64)

    def read(offsets: np.ndarray) -> np.ndarray:
        return np.asarray(ids[offsets[:, None] + span[None, :]], dtype=np.int32)

    def windows_at(offsets):
        windows = tf.numpy_function(read, [offsets], tf.int32, stateful=False)
        windows.set_shape([batch_size, seq_len + 1])
        return windows

    return as_written(windows_at)


def as_written(function):
    """`function` for `Dataset.map` or `tf.function` with AutoGraph off: traced as written.

    AutoGraph rewrites each Python function it traces (parse, transform, recompile the
    source) so that Python `if`/`for` over tensors become graph control flow. None of the
    input-pipeline or train-step functions here branch on a tensor, and the rewriting cost
    ~15-75 ms a function, ~350 ms before a causal-LM run's first step (measured by timing
    AutoGraph's conversions in a 20-step `kerasllm train causal-lm`).
    """
    import tensorflow as tf  # noqa: PLC0415

    return tf.autograph.experimental.do_not_convert(function)


def without_autotune(dataset):
    """`dataset` with tf.data's autotuning off; its stages keep their own fixed parallelism.

    A pipeline that autotunes runs a model thread that sleeps between optimisation
    passes, and destroying its iterator waits for that sleep to end (TF 2.21): `model.fit`
    then sat idle 4-20 s after the last step in about one run of three. Cutting
    windows out of a token table is cheap, so the pipeline needs no tuning: a prefetch
    of two batches keeps the next one ready.
    """
    import tensorflow as tf  # noqa: PLC0415

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def ragged_slices(sequences: Sequence[Sequence[int]]):
    """A dataset of variable-length int32 sequences (slices of one flat array).

    The rows are cut from one flat array by their lengths (`RaggedTensor.from_row_lengths`), not
    converted from Python lists element by element (`tf.ragged.constant`, which seq2seq batches
    used): over 400k pairs of 8-47 tokens a side, the first batch came after 1.5 s instead of
    31.7 s, with 440 instead of 644 MB more peak memory, the same batches (the shuffle sees the
    same rows) and ~3 ms a batch after that either way. Its elements are ragged tensors of
    ragged rank 0: `Dataset.map` hands them to its function as plain tensors, and
    `padded_batch` takes them after such a map (`data_tasks._bucketed`). A map here, before
    the callers' shuffle, would cost its buffer a function call per row (3.6-4.0 s instead of
    0.6 s to the first batch of 100k pairs, as when the encoder tasks sliced the array in a map).
    """
    import tensorflow as tf  # noqa: PLC0415

    flat = np.concatenate([np.zeros(0, np.int32)] + [np.asarray(s, np.int32) for s in sequences])
    lengths = np.asarray([len(s) for s in sequences], np.int64)
    return tf.data.Dataset.from_tensor_slices(tf.RaggedTensor.from_row_lengths(flat, lengths))

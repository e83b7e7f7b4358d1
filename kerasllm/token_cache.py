"""The token cache: a causal-LM corpus tokenized once, streamed, into flat files in the run directory.

    DIR/tokens/train.bin        the training part's token ids, uint16 (vocabulary <= 65536) or uint32
    DIR/tokens/validation.bin   the validation part: the last --validation-fraction of the ids
    DIR/tokens/tokens.json      dtype, counts, the source files (path, size, mtime) and the tokenizer's hash

nanoGPT's prepare step (token ids in a flat binary file, read through `np.memmap`), done by the
recipe: files are read in blocks (`kerasllm.data.text_blocks`), so memory stays bounded for a
corpus of any size, and `--resume` or a run over the same files and tokenizer reads the cache
instead of tokenizing again; a changed file, tokenizer or validation fraction rebuilds it.

The ids are today's `tokenize_corpus` + `TokenSplit.from_ids`: the files in order, each followed
by EOS, the last fraction of the ids for validation. What changes: the files are tokenized in
blocks, which gives the same ids wherever a block can be cut before a space (see `text_blocks`;
text without one for half a block, e.g. CJK, may get another subword token at a cut); and
bpe/unigram tokenizers are trained on at most `TOKENIZER_SAMPLE_BYTES` of text spread over the
files (`tokenizer_sample`), not on all of it.

Writes are atomic: the bins are written under `.partial` names and renamed, and tokens.json is
written last (removed first when rebuilding), so a cache without it is never taken for a finished one.

Measured on 2 shared cores, a generated 287 MB corpus (4 files of tinyshakespeare lines), from the
file list to the training and validation ids (tokenizer training included), one process each:

    char  before (read_corpus + train + tokenize_corpus + TokenSplit):  51.8 s, peak RSS 3827 MB
          after (train_corpus_tokenizer + cached_token_split):            6.0 s, peak RSS  413 MB
    bpe   before (vocabulary 4000): stopped after 190 s, still training the tokenizer, at 20.6 GB
          after: 168 s (35 s training on the 128 MB sample, 133 s tokenizing), peak RSS 424 MB
    either, the cache reused (--resume): 0.3-4 ms

tinyshakespeare (1.1M characters, the benchmark's corpus): 98 ms before, 30 ms after, of which 15 ms
build the cache. Training steps read as fast from the memory map as from memory (see `lm_windows`).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from kerasllm.atomic import worker_scratch_dir, write_json_atomic
from kerasllm.data import TokenSplit, text_blocks
from kerasllm.errors import KerasLLMError

TOKENS_DIR = "tokens"
META_FILE = "tokens.json"
FORMAT = 1
# bpe/unigram tokenizers learn from at most this much text (the `tokenizers` library trains from an
# iterator): their statistics settle long before, and training on a multi-GB corpus would take hours.
TOKENIZER_SAMPLE_BYTES = 128 << 20
# The sample is taken in pieces of this size spread evenly over each file.
SAMPLE_PIECE_BYTES = 1 << 20
# Non-char tokenizers encode pieces of this size, `ENCODE_PIECES` at a time: the library spreads a
# batch over the cores, and a batch's Encodings (ids, offsets, token strings: ~100 bytes a token)
# are freed before the next (16 pieces of 1 MB peaked at 1.5 GB on the 300 MB corpus below).
ENCODE_PIECE_BYTES = 256 << 10
ENCODE_PIECES = 8
# Bytes copied at a time when the validation part is moved out of the token file.
COPY_BYTES = 64 << 20
# With `progress`, training the tokenizer on this much text or more, or building the cache of this
# big a corpus, is said on stderr (a bar over the bytes too, for the cache): bpe took 23 s to train
# and 35 s to tokenize 107 MB, and nothing was printed before the first training line.
ANNOUNCE_BYTES = 8 << 20

log = logging.getLogger("kerasllm")


def megabytes(size: int) -> str:
    return f"{size / (1 << 20):,.0f} MB"


def tokenizer_sample(files: Sequence[Path], budget: int | None = None) -> Iterator[str]:
    """Text to train a bpe/unigram tokenizer on: every file whole (in blocks, checked as `text_blocks`
    checks them) when the corpus holds at most `budget` bytes (`TOKENIZER_SAMPLE_BYTES`), else from each
    file its share of the budget, in `SAMPLE_PIECE_BYTES` pieces spread evenly over it, cut at line ends
    (bad bytes are replaced here; tokenizing the corpus reports them with their line)."""
    budget = budget or TOKENIZER_SAMPLE_BYTES
    sizes = [path.stat().st_size for path in files]
    if sum(sizes) <= budget:
        for path in files:
            yield from text_blocks(path)
        return
    for path, size in zip(files, sizes):
        share = budget * size // sum(sizes)
        pieces = max(1, share // SAMPLE_PIECE_BYTES)
        with open(path, "rb") as file:
            for k in range(pieces):
                file.seek(k * size // pieces)
                raw = file.read(share // pieces)
                if k:  # from the start of a line
                    raw = raw[raw.find(b"\n") + 1:]
                elif raw.startswith(codecs.BOM_UTF8):  # as text_blocks skips it
                    raw = raw[len(codecs.BOM_UTF8):]
                raw = raw[:raw.rfind(b"\n") + 1] or raw
                text = raw.decode("utf-8", errors="replace")
                yield text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text  # as text_blocks


def train_corpus_tokenizer(files: Sequence[Path], kind: str, vocab_size: int, progress: bool = False):
    """The tokenizer of a causal-LM corpus: a char vocabulary from one streaming pass over every
    character (which also checks every file); the other kinds from `tokenizer_sample` (a byte
    tokenizer's vocabulary is the 256 bytes whatever the text). With `progress`, says so on
    stderr when it reads `ANNOUNCE_BYTES` or more."""
    from kerasllm.tokenizers import TextTokenizer  # noqa: PLC0415

    if kind == "char":
        texts = (text for path in files for text in text_blocks(path))
    else:
        texts = tokenizer_sample(files)
    size = sum(path.stat().st_size for path in files)
    read = size if kind == "char" else min(size, TOKENIZER_SAMPLE_BYTES)
    if progress and read >= ANNOUNCE_BYTES:
        of = "" if read == size else f" of the {megabytes(size)}"
        log.info("causal-lm: training the %s tokenizer on %s%s of text", kind, megabytes(read), of)
    return TextTokenizer.train(texts, kind=kind, vocab_size=vocab_size)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_key(files: Sequence[Path], tokenizer, validation_fraction: float) -> dict:
    """What a cache was built from; any difference means it is stale."""
    sources = []
    for path in files:
        stat = path.stat()
        sources.append({"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"format": FORMAT, "dtype": token_dtype(tokenizer.vocab_size).name, "files": sources,
            "tokenizer_sha256": hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest(),
            "validation_fraction": validation_fraction, "eos_between_documents": True}


def cached_token_split(directory: Path, files: Sequence[Path], tokenizer, validation_fraction: float,
                       seq_len: int, progress: bool = False) -> TokenSplit:
    """The corpus' training and validation ids as memory maps of the cache in `directory`, built first
    when it is missing, torn or stale; refused as `TokenSplit.from_ids` refuses too few tokens.
    With `progress`, building the cache of a corpus of `ANNOUNCE_BYTES` or more is said on stderr."""
    TokenSplit.check_fraction(validation_fraction)
    key = cache_key(files, tokenizer, validation_fraction)
    split = read_cache(directory, key)
    if split is None:
        split = build_cache(directory, files, tokenizer, key, progress)
    return split.checked(validation_fraction, seq_len)


def read_cache(directory: Path, key: dict) -> TokenSplit | None:
    """The cached split if `directory` holds a finished cache built from `key`, else None."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    dtype = np.dtype(key["dtype"])
    parts = {}
    for part in ("train", "validation"):
        path, count = directory / f"{part}.bin", meta["counts"][part]
        if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
            return None
        # np.memmap cannot map an empty file (a validation fraction of 0).
        parts[part] = np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
    return TokenSplit(parts["train"], parts["validation"])


def build_cache(directory: Path, files: Sequence[Path], tokenizer, key: dict, progress: bool = False) -> TokenSplit:
    """Tokenize `files` into `directory` (see the module docstring) and read the result back; with
    `progress` and a corpus of `ANNOUNCE_BYTES` or more, a line and a bar over its bytes on stderr."""
    from tqdm import tqdm  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)  # from here on the cache is not a finished one
    dtype = np.dtype(key["dtype"])
    ids_path, validation_path = directory / ".ids.partial", directory / ".validation.partial"
    size = sum(source["size"] for source in key["files"])
    announce = progress and size >= ANNOUNCE_BYTES
    if announce:
        log.info("causal-lm: tokenizing %s into %s (once; reruns and --resume read it)", megabytes(size), directory)
    # As the batch commands' bar: stderr, none with stderr closed (`2>&-`: sys.stderr is None).
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5, disable=not announce or sys.stderr is None)
    counted = (lambda text: None) if bar.disable else (lambda text: bar.update(len(text.encode("utf-8"))))
    total = 0
    def cannot_write(err: OSError) -> KerasLLMError:
        # A full disk: numpy's short write says only "42793 requested and 26624 written".
        ids_path.unlink(missing_ok=True)
        validation_path.unlink(missing_ok=True)
        free = shutil.disk_usage(directory).free
        return KerasLLMError(f"{directory}: cannot write the token cache ({err.strerror or err}; "
                             f"{megabytes(free)} free there)")

    def write(ids_file, ids) -> None:  # (a corpus file that cannot be read keeps its own error)
        try:
            np.asarray(ids, dtype=dtype).tofile(ids_file)
        except OSError as err:
            raise cannot_write(err) from None

    with bar, open(ids_path, "wb") as ids_file:
        for path in files:
            for ids in document_ids(path, tokenizer, on_text=counted):
                write(ids_file, ids)
                total += len(ids)
            write(ids_file, [tokenizer.eos_id])
            total += 1
    cut = int(total * (1.0 - key["validation_fraction"]))
    try:
        move_tail(ids_path, validation_path, cut * dtype.itemsize)
    except OSError as err:
        raise cannot_write(err) from None
    os.replace(ids_path, directory / "train.bin")
    os.replace(validation_path, directory / "validation.bin")
    write_json_atomic(directory / META_FILE, {"key": key, "counts": {"train": cut, "validation": total - cut}})
    return read_cache(directory, key)


def document_ids(path: Path, tokenizer, on_text=lambda text: None) -> Iterator[np.ndarray]:
    """The ids of one file, block by block: a char tokenizer's numpy lookup (`encode_array`) on
    `BLOCK_BYTES` blocks, the others' `encode_batch` over batches of smaller pieces. `on_text` is
    called with each block's text as it is read (progress)."""
    if tokenizer.is_char:
        for text in text_blocks(path):
            on_text(text)
            yield tokenizer.encode_array(text)
        return
    batch = []
    for text in text_blocks(path, ENCODE_PIECE_BYTES):
        on_text(text)
        batch.append(text)
        if len(batch) == ENCODE_PIECES:
            yield np.concatenate([np.asarray(ids, np.int64) for ids in tokenizer.encode_batch(batch)])
            batch = []
    if batch:
        yield np.concatenate([np.asarray(ids, np.int64) for ids in tokenizer.encode_batch(batch)])


def move_tail(source: Path, target: Path, offset: int) -> None:
    """Move the bytes of `source` from `offset` on into the new file `target`, truncating `source`."""
    with open(source, "r+b") as src, open(target, "wb") as dst:
        src.seek(offset)
        shutil.copyfileobj(src, dst, COPY_BYTES)
        src.truncate(offset)


@contextlib.contextmanager
def token_cache_dir(out: Path, worker_index: int) -> Iterator[Path]:
    """Where a worker keeps the run's token cache: `out/tokens` for the chief (the one writer of the
    run directory); a scratch directory of its own, removed afterwards, for every other worker of a
    multi-worker job (which tokenizes the corpus itself, as each worker did before the cache)."""
    if worker_index == 0:
        yield out / TOKENS_DIR
        return
    scratch = worker_scratch_dir("tokens", out, worker_index)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

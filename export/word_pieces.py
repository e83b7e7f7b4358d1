"""Words <-> sub-word pieces for token classification (tagging). No TensorFlow.

A tagger reads a sentence as words and gives one tag per word, but the model sees the
tokenizer's pieces. The same function, `align_words`, turns words into model input at training
(`kerasllm train token-classifier`) and at inference (`kerasllm tag`, `kerasllm evaluate`), so
a prediction maps back to its word exactly:

* each word is tokenized on its own, as `" " + word` (how it reads inside running text, so
  byte-level BPE gets its `Ġword` pieces and unigram its `▁word` ones);
* the pieces that hold only that leading space are separators; the word's first other piece
  carries the word's tag, its continuation pieces and the separators get -1 (ignored by the
  loss), and so does the BOS (CLS) token in front of the sentence.

Which piece holds what comes from the tokenizer's character offsets, so this works the same for
every kind kerasllm trains: `char` and `byte` (a piece per character or byte; the space is its
own piece), `bpe` (the space merged into the first piece) and `unigram` (`▁` alone or merged).

Example:
>>> pieces = align_words(tokenizer, ["Anna", "lives", "here"], bos_id=2)   # doctest: +SKIP
>>> pieces.words, pieces.starts        # the ids are the list itself: [2, ...]   # doctest: +SKIP
(['Anna', 'lives', 'here'], [2, 7, 14])
"""

from __future__ import annotations

from typing import Sequence

from kerasllm.export.predict import RecordError, kept_end

IGNORED = -1  # the label of a position without one (BOS, separators, continuation pieces, padding)
SEPARATOR = " "  # what goes before every word: the pieces that hold only this are separators
TRUNCATE_POLICIES = ("error", "left", "right")
# What `kerasllm tag` adds to the error for a sentence too long (`TagPredictor.check`'s default hint).
TRUNCATE_HINT = "use --truncate right to keep its first words"


class AlignmentError(RecordError):
    """A sentence that cannot be aligned: no words, a blank word, too long for the model (a
    `RecordError`: the batch CLI writes an error record for it and goes on)."""


class WordPieces(list):
    """`[BOS] + pieces` ids of a sentence (the list itself), with its `words` and `starts`: the
    position of each word's first piece. A list, so the batch machinery (lengths, padding) takes
    it like any tokenized text."""

    def __init__(self, ids: Sequence[int], words: Sequence[str], starts: Sequence[int]):
        super().__init__(ids)
        self.words = list(words)
        self.starts = list(starts)

    def labels(self, tag_ids: Sequence[int]) -> list[int]:
        """Per position: the word's tag id at its first piece, `IGNORED` everywhere else."""
        labels = [IGNORED] * len(self)
        for start, tag in zip(self.starts, tag_ids):
            labels[start] = tag
        return labels


def encode_words(tokenizer, words: Sequence[str]) -> list[tuple[list[int], int]]:
    """`(piece ids, index of the first piece after the separator)` of each word, tokenized on its own.

    `tokenizer` is a `kerasllm.tokenizers.TextTokenizer`. AlignmentError for a word that is
    blank or has no piece of its own (nothing to put its tag on).
    """
    encodings = tokenizer.tokenizer.encode_batch([SEPARATOR + word for word in words], add_special_tokens=False)
    encoded = []
    for number, (word, encoding) in enumerate(zip(words, encodings), start=1):
        first = next((i for i, (_, end) in enumerate(encoding.offsets) if end > len(SEPARATOR)), None)
        if not word.strip() or first is None:
            raise AlignmentError(f"word {number} ({word!r}) is blank or has no tokens")
        encoded.append((encoding.ids, first))
    return encoded


def align_words(tokenizer, words: Sequence[str], bos_id: int, max_length: int | None = None,
                truncate: str = "error", hint: str | None = None) -> WordPieces:
    """`[BOS]` and the pieces of `words`, each word tokenized on its own (see the module docstring).

    A sentence longer than `max_length` positions: AlignmentError under `truncate="error"`;
    `"right"` keeps the leading words that fit whole, `"left"` the trailing ones (the result's
    `words` are the ones kept). AlignmentError too for an empty sentence or a blank word. `hint`, if
    given, ends the too-long error in brackets (where the caller offers a way round it, e.g. `TRUNCATE_HINT`).
    """
    if truncate not in TRUNCATE_POLICIES:
        raise ValueError(f"unknown truncate policy {truncate!r}")
    if not words:
        raise AlignmentError("empty sentence (no words)")
    return join_words(encode_words(tokenizer, words), words, bos_id, max_length, truncate, hint)


def join_words(encoded: Sequence[tuple[list[int], int]], words: Sequence[str], bos_id: int,
               max_length: int | None = None, truncate: str = "error", hint: str | None = None) -> WordPieces:
    """`align_words` from `encode_words`' output (training encodes all sentences' words in one call)."""
    total = 1 + sum(len(ids) for ids, _ in encoded)
    kept_end(truncate)  # a mode that is none of error/left/right is refused, not read as one
    if max_length is not None and total > max_length:
        if truncate == "error":
            raise AlignmentError(f"sentence of {len(words)} words is {total} tokens, longer than the model's "
                                 f"max_length {max_length}" + (f" ({hint})" if hint else ""))
        kept, room = 0, max_length - 1
        order = range(len(encoded)) if truncate == "right" else range(len(encoded) - 1, -1, -1)
        for i in order:
            if len(encoded[i][0]) > room:
                break
            room -= len(encoded[i][0])
            kept += 1
        if not kept:
            raise AlignmentError(f"its {'first' if truncate == 'right' else 'last'} word alone is longer than the "
                                 f"model's {max_length} tokens")
        chosen = slice(0, kept) if truncate == "right" else slice(len(encoded) - kept, len(encoded))
        encoded, words = encoded[chosen], words[chosen]
    ids, starts = [bos_id], []
    for pieces, first in encoded:
        starts.append(len(ids) + first)
        ids.extend(pieces)
    return WordPieces(ids, words, starts)

"""Tokenizers trained on the user's text, saved as one `tokenizer.json`.

Built on Hugging Face `tokenizers` (Rust, no TensorFlow), so the very same file serves
the Keras-side data pipelines and the TensorFlow-free ONNX runtime. Kinds:

* `char`: one token per Unicode character seen in training (nanoGPT's character level).
* `byte`: one token per UTF-8 byte (256 ids, never unknown).
* `bpe`: byte-level BPE subwords (GPT-2 style).
* `unigram`: SentencePiece-style unigram subwords (no dummy prefix: text round-trips exactly).

Every kind reserves the same special tokens at the same ids (see `SPECIAL_TOKENS`). They are
put in by id (BOS, EOS, padding), never read from text: a user's text that spells one ("<eos>",
"<pad>") is encoded as the characters it is made of, so a prompt cannot end a sequence early and
a typed "<pad>" is not padding. (Unigram tokenizers trained before 2026-12-07 still read the
spellings as the special tokens: their unigram model holds them as pieces that win any match.)
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from kerasllm.errors import DataError, KerasLLMError, UsageError

log = logging.getLogger("kerasllm")

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<mask>", "<sep>"]
PAD, UNK, BOS, EOS, MASK, SEP = SPECIAL_TOKENS
# Unigram's word-boundary mark (what a space becomes in its pieces). SentencePiece's "▁" (U+2581)
# is also a character people type (the lowest block of a sparkline, "▁▂▃▅▇"), which decoding
# turned into a space; U+FDD0 is a noncharacter, which Unicode reserves for a program's own use
# and never puts in interchanged text. Unigram tokenizers trained before 2026-12-07 keep "▁".
WORD_MARK = "\ufdd0"
TOKENIZER_KINDS = ("char", "byte", "bpe", "unigram")
# How a too-small vocabulary's messages name the size: read by callers of `TextTokenizer.train`
# (its argument) and by users of `kerasllm train` (its flag), who get the same message.
VOCAB_SIZE = "vocab_size (--vocab-size)"
TOKENIZER_FILE = "tokenizer.json"
# A seq2seq model's target tokenizer, beside TOKENIZER_FILE, where its target has a vocabulary of its own.
TARGET_TOKENIZER_FILE = "target_tokenizer.json"
# Texts per call of the `tokenizers` library in `encode_batch` (it still spreads each call over the cores),
# and characters: while a call runs, each character costs ~370 bytes (its Encoding: ids, offsets,
# token strings, masks), so 8192 records of 10 kB each had asked for ~30 GB at once.
ENCODE_CHUNK = 8192
ENCODE_CHARS = 1 << 20
# A text longer than this is encoded, and given to a bpe/unigram trainer, in pieces of about this
# size (`text_pieces`): whole, one 30 MB line had peaked at 12 GB when encoded (a masked-LM
# record) and at 3.4 GB in training, where the same text as lines took 0.46 and 0.39 GB.
PIECE_CHARS = 1 << 18

# Where `text_pieces` cuts: before a space that follows a character other than whitespace. GPT-2's
# pre-tokenizer (byte-level BPE) ends a word there either way, and unigram's Metaspace starts the next
# word with its marker there either way (kerasllm.data.text_blocks cuts files so, after a printable
# ASCII character: on bytes, that is also a character boundary).
_CLEAN_CUT = re.compile(r"\S(?= )")


def text_pieces(text: str, size: int | None = None) -> Iterator[str]:
    """`text` in pieces of at most `size` characters (`PIECE_CHARS` by default): cut before a space
    that follows a character other than whitespace in the last half of a piece, where every tokenizer
    kind gives the pieces the whole text's ids; else (no such space for half a piece: a long run of
    CJK text, base64) after its last newline there, else at `size`, cuts that may change the token or
    two around them, as `kerasllm.data.text_blocks`' own fallback cuts do."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size:
        end = start + size
        half = start + size // 2
        cut = None
        for cut in _CLEAN_CUT.finditer(text, max(half, end - (1 << 12)), end):
            pass
        if cut is None:
            for cut in _CLEAN_CUT.finditer(text, half, end):
                pass
        if cut is not None:
            end = cut.end()
        else:
            newline = text.rfind("\n", half, end)
            end = newline + 1 if newline >= 0 else end
        yield text[start:end]
        start = end
    yield text[start:]


class TextTokenizer:
    """A trained tokenizer with kerasllm's special tokens.

    Example:
    >>> tok = TextTokenizer.train(["hello world"], kind="char")
    >>> tok.decode(tok.encode("hello"))
    'hello'
    """

    def __init__(self, tokenizer: Tokenizer):
        # Text spelling a special token is encoded as that text (see the module docstring); the
        # library would match the spellings as the special tokens. Not saved in tokenizer.json,
        # so set on every tokenizer made or loaded (all come through here).
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise DataError(f"tokenizer: special tokens missing: {', '.join(missing)}")

    # -- training ---------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "char", vocab_size: int = 8000) -> "TextTokenizer":
        """Train a tokenizer of `kind` on an iterable of texts (lines or documents).

        `vocab_size` (bpe, unigram; the other kinds' vocabulary is their characters or bytes) too
        small is a UsageError naming the size needed: bpe needs `MIN_BPE_VOCAB` (the 256 bytes and the
        special tokens), unigram a token for each character of the texts and the special tokens
        (`_unigram_too_small`; known once the texts are read, so that is checked by training).
        Its messages name the argument and the CLI's flag for it (`VOCAB_SIZE`): `kerasllm train`
        passes them on as they are.
        """
        if kind not in TOKENIZER_KINDS:
            raise UsageError(f"tokenizer: unknown kind {kind!r} (choose from {', '.join(TOKENIZER_KINDS)})")
        if kind in ("bpe", "unigram") and vocab_size < 1:
            raise UsageError(f"{VOCAB_SIZE} must be positive, got {vocab_size}")
        if kind == "bpe" and vocab_size < MIN_BPE_VOCAB:
            # (BpeTrainer silently gave MIN_BPE_VOCAB tokens for any size below it, 0 included.)
            raise UsageError(f"{VOCAB_SIZE} {vocab_size} is too small for a bpe tokenizer: it needs at least "
                             f"{MIN_BPE_VOCAB} (256 bytes and {len(SPECIAL_TOKENS)} special tokens)")
        if kind == "char":
            # The vocabulary is every character seen, most frequent first: counted here in
            # one pass (a WordLevelTrainer over one "word" per character is ~10x slower).
            chars = _chars_by_frequency(texts)
            vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
            tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
            # Every character, newlines included, is its own "word".
            tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            tokenizer.decoder = decoders.Fuse()
            tokenizer.add_special_tokens(SPECIAL_TOKENS)
            return cls(tokenizer)
        if kind in ("byte", "bpe"):
            tokenizer = Tokenizer(models.BPE(unk_token=None))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "bpe")
            tokenizer.decoder = decoders.ByteLevel()
            alphabet = pre_tokenizers.ByteLevel.alphabet()
            size = len(alphabet) + len(SPECIAL_TOKENS) if kind == "byte" else vocab_size
            trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet,
                                          special_tokens=SPECIAL_TOKENS, show_progress=False)
        else:
            tokenizer = Tokenizer(models.Unigram())
            # No "▁" prepended to the text (prepend_scheme="never", as bpe adds no prefix space): the
            # default "always" prepends one only where the text does not start with a space and its
            # decoder strips the first "▁" regardless, so leading whitespace was lost ("  a" -> " a",
            # " " -> "") and so was the space before a continuation decoded on its own.
            # A word-boundary mark of its own (`WORD_MARK`), not "▁". And "<" is a piece of its own
            # before Metaspace: the trainer puts the special tokens in the unigram model as pieces
            # that would win any match of their spelling in a text (score 0, the highest), and
            # every spelling starts with "<", so none can match across that cut.
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split("<", behavior="isolated"),
                pre_tokenizers.Metaspace(replacement=WORD_MARK, prepend_scheme="never")])
            tokenizer.decoder = decoders.Metaspace(replacement=WORD_MARK, prepend_scheme="never")
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK,
                                              show_progress=False)
            chars: set[str] = set()
            texts = _recording_chars(texts, chars)
        # The trainers pre-tokenize each text whole, several at a time: a corpus read in 16 MB blocks
        # (or a record of 30 MB) had peaked at 3.4-4 GB, against 0.4 GB in pieces.
        texts = (piece for text in texts for piece in (text_pieces(text) if len(text) > PIECE_CHARS else (text,)))
        try:
            tokenizer.train_from_iterator(texts, trainer=trainer)
        except Exception as err:  # the Rust side raises a bare Exception
            if kind == "unigram" and "not large enough" in str(err):
                raise _unigram_too_small(vocab_size, chars) from None
            raise
        if kind == "unigram":
            tokenizer = _canonical_unigram(tokenizer)
        if kind == "unigram" and tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
            # Between the characters' count and the minimum, the trainer returned more tokens than asked.
            raise _unigram_too_small(vocab_size, chars)
        learned = tokenizer.get_vocab_size(with_added_tokens=True)
        if kind != "byte" and learned < vocab_size:
            # The trainers stop where the texts give no more merges or pieces, without a word: a model
            # then had another vocabulary than asked (a later --init-from sized for it, a comparison).
            log.warning("warning: %s %d is more than the data gives: the tokenizer has %d tokens", VOCAB_SIZE,
                        vocab_size, learned)
        return cls(tokenizer)

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        # Written by Python, not by the library's save(path), which takes the path as UTF-8 text: a
        # name that is not (surrogate-escaped bytes, or any non-ASCII name under a C locale) had failed
        # in a traceback ("surrogates not allowed"). Pretty-printed, byte for byte what save() wrote.
        path.write_bytes(self.tokenizer.to_str(pretty=True).encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | Path, data: bytes | None = None) -> "TextTokenizer":
        """The tokenizer in file `path`; `data`: its bytes, already read (a bundle's, checked against
        its manifest: `Bundle.load_tokenizer`), `path` then only names it in messages."""
        path = Path(path)
        if data is None and path.is_dir():
            path = path / TOKENIZER_FILE
        if data is None and not path.is_file():
            raise DataError(f"tokenizer: {path}: no such file")
        # Read by Python, for the path's sake (see `save`): from_file(path) had refused such a path
        # with "cannot be read", as if the tokenizer were bad.
        try:
            text = (path.read_bytes() if data is None else data).decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"tokenizer: {path}: cannot be read ({err})") from None
        try:
            return cls(Tokenizer.from_str(text))
        except Exception as err:  # the Rust side raises a bare Exception
            raise DataError(f"tokenizer: {path}: cannot be read ({err})") from None

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        return cls(Tokenizer.from_str(text))

    # -- ids --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def largest_id(self) -> int:
        """The largest token id (-1 for none): past `vocab_size - 1` where the ids have gaps."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)

    def token_to_id(self, token: str) -> int:
        return self.tokenizer.token_to_id(token)

    @property
    def pad_id(self) -> int:
        return self.token_to_id(PAD)

    @property
    def unk_id(self) -> int:
        return self.token_to_id(UNK)

    @property
    def bos_id(self) -> int:
        return self.token_to_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(EOS)

    @property
    def mask_id(self) -> int:
        return self.token_to_id(MASK)

    @property
    def sep_id(self) -> int:
        return self.token_to_id(SEP)

    def special_ids(self) -> dict[str, int]:
        return {name: self.token_to_id(tok) for name, tok in zip(("pad", "unk", "bos", "eos", "mask", "sep"),
                                                                  SPECIAL_TOKENS)}

    # -- text <-> ids -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if len(text) > PIECE_CHARS:
            return self.encode_batch([text])[0]
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """`encode(text)` as an int32 array; fast for large character-level corpora.

        A character tokenizer's ids are a per-character lookup, done here with numpy
        (~20x faster than the Rust pre-tokenizer's one split per character). Text holding
        a special token's spelling is its characters on both paths (`encode_special_tokens`).
        """
        if self._char_vocab is None:
            return np.asarray(self.encode(text), dtype=np.int32)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        # A table indexed by code point (a sort of the codes, np.unique, cost ~10x more);
        # code points past the vocabulary's largest read its last entry, unknown.
        lookup = self._char_lookup
        return lookup[np.minimum(codes, len(lookup) - 1)]

    @property
    def _char_lookup(self) -> np.ndarray:
        """A char tokenizer's id of each code point up to the vocabulary's largest, then unknown."""
        if not hasattr(self, "_char_lookup_cache"):
            vocab = {ord(token): i for token, i in self._char_vocab.items() if len(token) == 1}
            lookup = np.full(max(vocab, default=0) + 2, self.unk_id, dtype=np.int32)
            lookup[list(vocab)] = list(vocab.values())
            self._char_lookup_cache = lookup
        return self._char_lookup_cache

    @property
    def is_char(self) -> bool:
        return self._char_vocab is not None

    @property
    def _char_vocab(self) -> dict[str, int] | None:
        """The vocabulary when this is a `char` tokenizer (WordLevel over single characters)."""
        if not hasattr(self, "_char_vocab_cache"):
            state = json.loads(self.tokenizer.to_str())
            is_char = state["model"]["type"] == "WordLevel" and (state.get("decoder") or {}).get("type") == "Fuse"
            self._char_vocab_cache = self.tokenizer.get_vocab() if is_char else None
        return self._char_vocab_cache

    def unknown_chars(self, texts: Iterable[str]) -> list[str]:
        """The characters of `texts` a `char` tokenizer has no token for, sorted ([] for other kinds)."""
        vocab = self._char_vocab
        return sorted({char for text in texts for char in text} - vocab.keys()) if vocab is not None else []

    def encode_bounded(self, text: str, max_tokens: int, keep: str = "start") -> tuple[list[int], bool]:
        """`(ids, whole)` for a text of which a model reads at most `max_tokens` tokens, from its
        start or (`keep="end"`) its end. `whole`: `ids` are the whole text's. Otherwise the text
        holds more than `max_tokens` tokens and `ids` are those of a window of it: their first
        (last) `max_tokens` are the whole text's.

        A long text is not tokenized whole just to be cut or refused (a 10 MB record had taken
        86 s and 4 GB: the library keeps ~400 bytes a character); see `encode_batch_bounded`.
        """
        if keep not in ("start", "end"):
            raise ValueError(f"keep must be 'start' or 'end', got {keep!r}")
        window = self._window_chars(max_tokens)
        if len(text) <= window:
            return self.encode(text), True
        ids = self.encode(text[:window] if keep == "start" else text[-window:])
        if len(ids) <= max_tokens:  # the window showed too few tokens (see encode_batch_bounded): all of it
            return self.encode(text), True
        return ids, False

    def encode_batch_bounded(self, texts: Sequence[str], max_tokens: int) -> list[tuple[list[int], bool]]:
        """`encode_bounded(text, max_tokens)` of each text (their starts), in batched library calls.

        The window is `2 * (max_tokens + 1)` times the longest token's characters (no token covers
        more, so it holds twice the tokens wanted) plus 256 characters, and only its last tokens can
        differ from the whole text's where it cuts a word. A text whose window yields no more than
        `max_tokens` tokens (characters the tokenizer drops, or unknowns fused into one token) is
        encoded whole. The one place the first tokens could differ: a unigram "word" (a run without
        spaces) longer than the window, whose best segmentation can shift with its length.
        """
        window = self._window_chars(max_tokens)
        texts = list(texts)
        cut = [len(text) > window for text in texts]
        encoded = self.encode_batch([text[:window] if long else text for text, long in zip(texts, cut)])
        results = []
        for text, long, ids in zip(texts, cut, encoded):
            if long and len(ids) <= max_tokens:
                results.append((self.encode(text), True))
            else:
                results.append((ids, not long))
        return results

    def _window_chars(self, max_tokens: int) -> int:
        if not hasattr(self, "_longest_token"):
            # Token strings in the model's own alphabet: one character a byte for byte-level BPE (at
            # least the characters they stand for), WORD_MARK for a space in unigram pieces.
            self._longest_token = max(len(token) for token in self.tokenizer.get_vocab(with_added_tokens=False))
        return 2 * (max_tokens + 1) * self._longest_token + 256

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text. At most `ENCODE_CHUNK` texts and about `ENCODE_CHARS` characters per
        call of the library, a text longer than `PIECE_CHARS` in pieces (`text_pieces`): each Encoding
        (ids, offsets, token strings, masks) is dropped once its ids are taken, so memory stays bounded
        whatever the texts' number and lengths."""
        pieces: list[str] = []  # every text's pieces, in order
        owners: list[int] = []  # the text each piece is of
        count = 0
        for count, text in enumerate(texts, 1):
            for piece in text_pieces(text) if len(text) > PIECE_CHARS else (text,):
                pieces.append(piece)
                owners.append(count - 1)
        ids: list[list[int]] = [[] for _ in range(count)]
        start = 0
        while start < len(pieces):
            end, chars = start + 1, len(pieces[start])
            while end < len(pieces) and end - start < ENCODE_CHUNK and chars + len(pieces[end]) <= ENCODE_CHARS:
                chars += len(pieces[end])
                end += 1
            encodings = self.tokenizer.encode_batch(pieces[start:end], add_special_tokens=False)
            for owner, encoding in zip(owners[start:end], encodings):
                ids[owner].extend(encoding.ids)
            del encodings
            start = end
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; ValueError naming an id outside `0 .. vocab_size - 1` (the library
        raises a bare OverflowError for a negative one and drops one past the vocabulary)."""
        ids = list(map(int, ids))
        try:
            if max(ids, default=0) >= self.vocab_size:
                raise self._bad_id(ids)
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        except OverflowError:  # a negative id (or one past 2**32)
            raise self._bad_id(ids) from None

    def decode_generated(self, ids: Sequence[int]) -> str:
        """`decode` of generated ids, up to their last whole character.

        A byte-level tokenizer's ids (`byte`, `bpe`) can end inside a character's UTF-8 bytes where
        generation stops (`max_new_tokens`, the model's max_length: a CJK character is 3 bytes, an emoji
        4), which `decode` writes as U+FFFD ("吃苹果" cut after 果's first byte: "吃苹\ufffd"). That
        unfinished tail is left out here. Bytes that can never be UTF-8, wherever they are, stay
        U+FFFD. (The `tokenizers` library has no incremental decoding, so the tail's bytes are read
        from the tokens' byte-level spellings: `_BYTE_OF_CHAR`.)
        """
        text = self.decode(ids)
        if not text.endswith("\ufffd") or not isinstance(self.tokenizer.decoder, decoders.ByteLevel):
            return text
        special = set(self.special_ids().values())
        tail = b""
        for token_id in reversed(list(map(int, ids))):
            if token_id not in special:
                tail = bytes(_BYTE_OF_CHAR[char] for char in self.tokenizer.id_to_token(token_id)) + tail
                if len(tail) >= 4:  # a UTF-8 character's most
                    break
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        utf8.decode(tail, final=False)
        return text[:-1] if utf8.getstate()[0] else text  # its pending bytes: one U+FFFD in `text`

    def decode_batch(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` of each row (ValueError as `decode` for an id outside the vocabulary)."""
        rows = [list(map(int, r)) for r in rows]
        try:
            if max(map(max, filter(None, rows)), default=0) >= self.vocab_size:
                raise self._bad_id([i for r in rows for i in r])
            return self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        except OverflowError:
            raise self._bad_id([i for r in rows for i in r]) from None

    def _bad_id(self, ids: Sequence[int]) -> ValueError:
        bad = next(i for i in ids if not 0 <= i < self.vocab_size)
        return ValueError(f"token id {bad} is outside the vocabulary (ids 0 .. {self.vocab_size - 1}, "
                          f"vocabulary size {self.vocab_size})")

    def describe(self) -> dict:
        model = json.loads(self.tokenizer.to_str())["model"]["type"]
        return {"model": model, "vocab_size": self.vocab_size, "special_ids": self.special_ids()}


def _canonical_unigram(tokenizer: Tokenizer) -> Tokenizer:
    """A trained unigram `tokenizer` with pieces, scores and ids that depend on the texts only.

    `tokenizers`' UnigramTrainer has no seed and is not deterministic (the same texts and `--seed` gave
    another tokenizer.json in every process, RAYON_NUM_THREADS=1 or not, and with rare characters in
    the training texts, other losses and weights): its scores differ in their last digits (parallel
    sums), and the characters the pieces lack, added at the end with scores 1e-4 apart, come in
    hash-map order. So: scores rounded to 1e-8 (no segmentation turns on less); single characters
    whose scores lie within `_ADDED_CHARS_GAP` of each other (those added characters) given those
    scores in code-point order; the special tokens kept at their ids and the rest ordered by score,
    then piece. Written by hand: the library offers neither a seed nor a canonical form."""
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    special = model["vocab"][:len(SPECIAL_TOKENS)]
    pieces = [(piece, round(score, 8)) for piece, score in model["vocab"][len(SPECIAL_TOKENS):]]
    words = [(piece, score) for piece, score in pieces if len(piece) != 1]
    chars = sorted(((score, piece) for piece, score in pieces if len(piece) == 1), reverse=True)
    runs: list[list[tuple[float, str]]] = []
    for score, piece in chars:  # runs of near-equal scores, highest first
        if runs and runs[-1][-1][0] - score <= _ADDED_CHARS_GAP:
            runs[-1].append((score, piece))
        else:
            runs.append([(score, piece)])
    for run in runs:
        words += zip(sorted(piece for _, piece in run), [score for score, _ in run])
    model["vocab"] = special + sorted(words, key=lambda entry: (-entry[1], entry[0]))
    model["unk_id"] = next(i for i, (piece, _) in enumerate(model["vocab"]) if piece == UNK)
    return Tokenizer.from_str(json.dumps(data))


# UnigramTrainer's added characters fall 1e-4 apart (its `min_score_penalty_delta`): a run of single
# characters whose scores are this close is one such batch, reordered by code point.
_ADDED_CHARS_GAP = 5e-4


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's spelling of the 256 bytes (GPT-2's `bytes_to_unicode`, which `tokenizers`'
    ByteLevel uses and does not expose): printable Latin-1 bytes are their own character, the others
    U+0100 on, in byte order. Inverted: character -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}


_BYTE_OF_CHAR = _byte_level_alphabet()

# The smallest bpe vocabulary: one token per byte and the special tokens (byte-level BPE's alphabet).
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


def check_vocabulary(tokenizer: "TextTokenizer", size: int, where: str | Path) -> None:
    """KerasLLMError when `tokenizer` (loaded from `where`) has ids the model's vocabulary of `size`
    does not: another model's tokenizer, which would feed the graph ids out of range or decode
    garbage. (Smaller is allowed: a model's vocabulary may be padded past its tokenizer's.)
    Judged by the largest id, not the count: a tokenizer whose ids have a gap (one id moved past
    the vocabulary) had passed and failed the job at the first record using it."""
    if tokenizer.vocab_size > size:
        raise KerasLLMError(f"{where}: {tokenizer.vocab_size} token ids, more than the model's vocabulary of {size}: "
                            "not this model's tokenizer")
    if tokenizer.largest_id >= size:
        raise KerasLLMError(f"{where}: token id {tokenizer.largest_id}, outside the model's vocabulary of {size} "
                            f"(ids 0..{size - 1}): not this model's tokenizer")


def load_seq2seq_tokenizers(path: str | Path, config: dict, source_file: str = TOKENIZER_FILE,
                           target_file: str | None = None, load=None) -> tuple[TextTokenizer, TextTokenizer]:
    """`(source, target)` tokenizers of a model dir or bundle at `path`, checked against the model's
    vocabularies. The config says whether the target has its own (`target_vocab_size`): a missing
    target tokenizer had silently become the source's (garbage translations, exit 0).
    `load(name) -> TextTokenizer` reads file `name` of `path` (a bundle's: `Bundle.seq2seq_tokenizers`,
    which checks the name and the bytes against its manifest)."""
    path = Path(path)
    load = load or (lambda name: TextTokenizer.load(path / name))
    source = load(source_file)
    check_vocabulary(source, int(config["vocab_size"]), path / source_file)
    target_size = int(config.get("target_vocab_size") or 0)
    if not target_size:
        return source, source
    target_path = path / (target_file or TARGET_TOKENIZER_FILE)
    if not target_path.is_file():
        raise KerasLLMError(f"{target_path}: missing (the model has a target vocabulary of its own, "
                            f"{target_size} ids)")
    target = load(target_file or TARGET_TOKENIZER_FILE)
    check_vocabulary(target, target_size, target_path)
    return source, target


def token_count(ids: Sequence[int], whole: bool, limit: int) -> str:
    """How many tokens `encode_bounded`'s `(ids, whole)` show, for a message: the count, or for a
    text cut to a window only that it is more than `limit`."""
    return f"{len(ids)}" if whole else f"more than {limit}"


def _recording_chars(texts: Iterable[str], chars: set[str]) -> Iterator[str]:
    """`texts`, adding each one's characters to `chars` as it passes (the trainer reads them once)."""
    for text in texts:
        chars.update(text)
        yield text


def _unigram_too_small(vocab_size: int, chars: set[str]) -> UsageError:
    """The error for a unigram `vocab_size` below what texts of these characters need to train to that
    size: a token per character (a space counts as the `WORD_MARK` that replaces it), the special tokens and
    the trainer's own unknown token. Below the characters' count the trainer fails; from there up to
    the minimum it returned more tokens than asked."""
    pieces = len({WORD_MARK if c == " " else c for c in chars})
    more = len(SPECIAL_TOKENS) + 1
    return UsageError(f"{VOCAB_SIZE} {vocab_size} is too small for a unigram tokenizer of this data: it needs at "
                      f"least {pieces + more} (a token for each of its {pieces} distinct characters and {more} more)")


# Characters counted per call of np.bincount: texts are joined up to this length first, so that
# many short texts (one a line) do not each pay for the 1.1M-entry count table.
CHAR_COUNT_GROUP = 1 << 20
CODE_POINTS = 0x110000


def _chars_by_frequency(texts: Iterable[str]) -> list[str]:
    """Every character of `texts`, most frequent first (ties by code point).

    Counted with np.bincount over UTF-32 code points (~10x faster than `collections.Counter` on
    large texts), one streaming pass: no more than a group of texts is held at once.
    """
    counts = np.zeros(CODE_POINTS, dtype=np.int64)
    group: list[str] = []
    size = 0

    def count() -> None:
        codes = np.frombuffer("".join(group).encode("utf-32-le"), dtype=np.uint32)
        counts[:] += np.bincount(codes, minlength=CODE_POINTS)
        group.clear()

    for text in texts:
        group.append(text)
        size += len(text)
        if size >= CHAR_COUNT_GROUP:
            count()
            size = 0
    if group:
        count()
    seen = np.flatnonzero(counts)
    return [chr(code) for code in seen[np.lexsort((seen, -counts[seen]))]]

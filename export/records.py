"""Streaming readers of input records: plain text, JSONL, TSV and CSV. No TensorFlow.

One reader serves both sides: training recipes (which refuse a file with a bad record,
naming its line) and batch inference (which writes an error record for it and goes on).
Files are read as bytes line by line, so memory does not grow with the file and one
undecodable line spoils only its own record. A UTF-8 byte order mark opening a file (as
Excel's "CSV UTF-8" writes) is dropped (`_raw_lines`, which every reader reads through).

Formats (`fmt="auto"` picks by suffix: .jsonl/.json -> jsonl, .tsv, .csv, .conll, else text):
    text   one record per line, field "text"
    jsonl  one JSON object per line, fields by name
    tsv    header row with column names, tab-separated rows (csv's excel-tab dialect)
    csv    header row, comma-separated rows (RFC 4180 quoting, csv's excel dialect)
           In both, a quoted field may hold newlines (as the csv module writes them), so a
           record may span several physical lines; its line is the line where it starts
    conll  one word per line, its tag in the last column (columns split on whitespace), a
           blank line after each sentence; a record per sentence, fields "tokens" and "tags"
           (lists), its line the sentence's first; `-DOCSTART-` lines are skipped
Blank lines are skipped in every format (they are not records; in CoNLL they end a sentence).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from kerasllm.errors import DataError, UsageError

FORMATS = ("text", "jsonl", "tsv", "csv", "conll")
# The longest TSV/CSV field read, in characters: csv's default (131,072) had made a long document an
# error record where JSONL reads it; a quote left open still stops at this many characters.
FIELD_LIMIT = 1 << 26
# The fields of a CoNLL record (a sentence): its words and their tags, as lists of strings.
CONLL_FIELDS = ("tokens", "tags")


@dataclass
class Record:
    """One input record.

    Attributes:
        line: 1-based line number in the file (what error messages name).
        id: the `id_field` value when given (see `read_records`), else the line number as a string.
        fields: field name -> value (strings; JSON numbers/bools are kept as JSON scalars).
        error: why the record could not be read (bad UTF-8, malformed JSON, ragged row), else None.
    """

    line: int
    id: str
    fields: dict = field(default_factory=dict)
    error: str | None = None

    def get(self, name: str) -> str:
        """The field `name` as text; DataError naming the line when it is missing, null, or a list
        or object (which has no one text: `["a", "b"]` is not the text `'["a", "b"]'`).

        A JSON number or boolean is taken as its literal, as written (`5` -> "5", `1.10` -> "1.10",
        `true` -> "true"): labels and ids are often written so (`"stars": 5`; the README's "labels
        as names or numbers"), and a seq2seq target may be a number (`"target": 402`). One rule for
        every field, in training and in batch inference alike. A JSON string escaping half of a
        surrogate pair (`"\\ud83d"`, a cut emoji) is no text: a DataError naming the line.
        """
        value = self._value(name)
        if isinstance(value, str):  # a _NumberLiteral too
            return _text(str(value), self.line, name)
        if isinstance(value, bool):
            return json.dumps(value)
        if isinstance(value, _NonStandardConstant):
            raise DataError(f"line {self.line}: field {name!r} is {value}, which JSON does not allow "
                            "(write a string or a number)")
        raise DataError(f"line {self.line}: field {name!r} is not a string ({_json_kind(value)})")

    def words(self, name: str, numbers: bool = False) -> list[str]:
        """The field `name` as a list of strings (a sentence's words or tags); DataError naming
        the line when it is missing or holds anything else. With `numbers`, JSON numbers in it are
        taken as their literals, as `get` takes them (tags: Hugging Face's NER exports write them as
        class ids, `"ner_tags": [3, 0, 7]`)."""
        value = self._value(name)
        kinds = (str, _NumberLiteral) if numbers else (str,)  # `type`: a _NumberLiteral is a str too
        if not isinstance(value, list) or not all(type(item) in kinds for item in value):
            raise DataError(f"line {self.line}: field {name!r} is not a list of strings")
        return [_text(str(item), self.line, name) for item in value]

    def has(self, name: str) -> bool:
        """Whether the record has the field `name` (null or not; a dotted name: a nested one, as `get` reads it)."""
        return self._lookup(name) is not _MISSING

    def _lookup(self, name: str):
        """The field `name`, or where the record has no field of that name and the name has dots, the
        nested field it names (`translation.en` in Hugging Face's `{"translation": {"en": ...}}`); else _MISSING."""
        value = self.fields.get(name, _MISSING)
        if value is _MISSING and "." in name:
            value = self.fields
            for part in name.split("."):
                value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        return value

    def _value(self, name: str):
        if self.error:
            raise DataError(f"line {self.line}: {self.error}")
        value = self._lookup(name)
        if value is _MISSING:
            known = ", ".join(sorted(self.fields)) or "none"
            raise DataError(f"line {self.line}: missing field {name!r} (fields: {known})")
        if value is None:  # JSON null: the field is there, its value is not
            raise DataError(f"line {self.line}: field {name!r} is null")
        return value


_MISSING = object()


class _NumberLiteral(str):
    """A JSON number as the file writes it: the JSONL reader parses numbers so (`json.loads`'s
    parse_int/parse_float), as floats would read `1.10` as "1.1", `1e2` as "100.0" (the id of
    `100.0` too) and round `9007199254740993.0`, and an int of over 4,300 digits raised."""


def surrogate_problem(value: str) -> str | None:
    """What is wrong with a str holding a lone surrogate (only a JSON escape makes one: UTF-8
    cannot; the tokenizers and every writer of UTF-8 fail on it), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"half of a surrogate pair (\\u{ord(value[err.start]):04x} at character {err.start + 1}), "
                "which is not text")
    return None


def _text(value: str, line: int, name: str) -> str:
    """`value`, or a DataError naming the line where it holds a lone surrogate (`surrogate_problem`)."""
    problem = surrogate_problem(value)
    if problem is not None:
        raise DataError(f"line {line}: field {name!r} holds {problem}")
    return value


class _NonStandardConstant:
    """`NaN`, `Infinity` or `-Infinity` where a JSON value stands: not JSON, but Python's
    `json.dumps` writes them for float NaN and infinities, so JSONL made by Python scripts holds
    them. Read as this marker (`json.loads`'s parse_constant), a field holding one is refused
    as what it is, not as "not a string (a float)"; in a field nobody reads it does no harm."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return self.name


def _json_kind(value) -> str:
    """How a JSON value is named in messages: "a list", "an object"."""
    return {list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UsageError(f"unknown input format {fmt!r} (choose from auto, {', '.join(FORMATS)})")
        return fmt
    suffix = Path(str(path)).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv", ".csv": "csv",
            ".conll": "conll"}.get(suffix, "text")


def _open(path: str | Path) -> BinaryIO:
    if str(path) == "-":
        return stdin_bytes()
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected a file")
    try:
        return open(path, "rb")
    except PermissionError as err:  # (had been a raw "[Errno 13] Permission denied: 'secret.txt'")
        raise UsageError(f"{path}: cannot read it ({err.strerror})") from None


def stdin_bytes() -> BinaryIO:
    """Standard input's bytes; a UsageError where it is closed (`cmd <&-`, some daemons and job
    runners), where Python's `sys.stdin` is None."""
    if sys.stdin is None:
        raise UsageError("standard input is closed: pass --input FILE")
    return sys.stdin.buffer


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark
# Compressed files by their first bytes: read as lines of bytes, a .gz had become thousands of records of
# deflate fragments (some valid UTF-8, so classified), and a training corpus's message was only a bad byte.
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
               (b"PK\x03\x04", "zip"))
_BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")


class NotText(DataError):
    """A file (or stream) that is not UTF-8 text as a whole: compressed, UTF-16, or lines ended by a
    carriage return alone. The message leaves the file's name to the reader that knows it."""


def not_text(head: bytes) -> str | None:
    """Why a file whose first line (or first bytes) is `head` cannot be read as UTF-8 text, or None.

    UTF-16 (Excel's "Unicode Text", Notepad's "UTF-16 LE", `bcp -w`) had read as text with a NUL
    between characters: each ASCII code unit is valid UTF-8, so only the byte order mark's line
    failed and every other record got a confident label (without a mark, exit 0)."""
    for magic, name in _COMPRESSED:
        if head.startswith(magic):
            return f"{name}-compressed data; kerasllm reads UTF-8 text: decompress it first"
    if _BZIP2.match(head):
        return "bzip2-compressed data; kerasllm reads UTF-8 text: decompress it first"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or _utf16_without_mark(head):
        return "UTF-16 (or UTF-32) encoded text; kerasllm reads UTF-8: save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"
    return None


def _utf16_without_mark(head: bytes) -> bool:
    """ASCII written as UTF-16 without a byte order mark: every other byte NUL (a UTF-8 text never
    holds a NUL between each of its characters)."""
    sample = head[:64].rstrip(b"\r\n")
    if len(sample) < 2:
        return False
    even, odd = sample[0::2], sample[1::2]
    return (not odd.strip(b"\x00") and b"\x00" not in even) or (not even.strip(b"\x00") and b"\x00" not in odd)


def cr_only_line_ends(line: bytes) -> bool:
    """Whether a file whose first line (up to its first line feed) is `line` has its lines ended by a
    carriage return alone (classic Mac OS, Excel for Mac's "Macintosh" formats): read by line feeds it is
    one line, its records merged into one (it had been classified as one text, exit 0). So: no line feed
    in the whole file (the line has none) and carriage returns inside it; carriage returns in a file with
    line feeds (a captured progress bar, a quoted CSV cell) are text, read as before."""
    return not line.endswith(b"\n") and b"\r" in line.rstrip(b"\r")


CR_ONLY = ("its lines end in a carriage return alone (classic Mac line ends), so it reads as one line: end them "
           "with a line feed (e.g. tr '\\r' '\\n')")


def _raw_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, the line's bytes with its newline) of `stream`; one UTF-8 byte order
    mark opening the file is dropped, so that it ends up in no text, column name or token.
    Every reader here reads its lines through this: a file that is not UTF-8 text as a whole
    (`not_text`, `cr_only_line_ends`) raises NotText at its first line, before any record."""
    for number, raw in enumerate(stream, start=1):
        if number == 1:
            if raw.startswith(BOM):
                raw = raw[len(BOM):]
            elif reason := not_text(raw):
                raise NotText(f"line 1: {reason}")
            if cr_only_line_ends(raw):
                raise NotText(f"line 1: {CR_ONLY}")
        yield number, raw


def _utf8_reason(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"


def _decoded_lines(stream: BinaryIO, lines: tuple[int, int] | None = None
                   ) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text without the newline or None, decode error or None).

    With `lines=(first, last)` (1-based, inclusive) only those lines are decoded; reading
    stops after `last`.
    """
    for number, raw in _raw_lines(stream):
        if lines is not None:
            if number > lines[1]:
                return
            if number < lines[0]:
                continue
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            yield number, raw.decode("utf-8"), None
        except UnicodeDecodeError as err:
            yield number, None, _utf8_reason(raw, err)


def read_records(path: str | Path, fmt: str = "auto", id_field: str | None = None,
                 lines: tuple[int, int] | None = None, text_field: str | None = None) -> Iterator[Record]:
    """Yield the records of `path` (`-` is standard input) one by one.

    `lines=(first, last)` (1-based, inclusive) reads only the records on those lines (a
    TSV/CSV header is still read from line 1): how a shard of a file is read.

    `id_field` names the field holding each record's id. A TSV/CSV header states its columns
    up front, so one without the `id_field` column (or, when given, the `text_field` column
    the caller will read) is a UsageError naming the columns it has, raised when the header
    is read, before any record: a misspelt column name would otherwise cost every record
    (the ids silently line numbers, or an error record each). JSONL has no header: a record
    without its id (missing, null, a list or object, as `Record.get` reads fields) comes
    back as an error record naming its line, as one without its text becomes one when the
    text is read; its id is its line number. Plain text and CoNLL records have no fields
    to name, so an `id_field` for them is a UsageError.

    Raises DataError only for problems with the file as a whole (no header row in a
    TSV/CSV, duplicate column names); a bad record comes back with `error` set.
    """
    # A JSONL stream (`zcat x.jsonl.gz | kerasllm classify ...`, `-i <(...)`: no suffix to say so) had been
    # read as plain text, each JSON line classified as the text it spells, exit 0: a stream's first record
    # is looked at. (A file without a suffix is plain text, as documented: a corpus may start with anything.)
    sniff = fmt == "auto" and (str(path) == "-" or not Path(path).is_file())
    fmt = detect_format(path, fmt)
    if id_field and fmt in ("text", "conll"):
        raise UsageError(f"{path}: {fmt} input has no fields to hold an id ({id_field!r}); ids need JSONL, "
                         "TSV or CSV input")
    if fmt == "text" and text_field not in (None, "text"):  # had been an error record per line
        raise UsageError(f"{path}: plain text input is one text a line, field 'text'; a text field "
                         f"({text_field!r}) needs JSONL, TSV or CSV input")
    stream = _open(path)
    try:
        yield from _records(stream, fmt, path, id_field, lines, text_field, sniff)
    except NotText as err:
        raise DataError(f"{'standard input' if str(path) == '-' else path}: {err}") from None
    finally:
        # Standard input stays open for the caller; compared by the path, as `sys.stdin` is None
        # where it was closed (the end of every `-i FILE` job had raised there).
        if str(path) != "-":
            stream.close()


def _records(stream: BinaryIO, fmt: str, path, id_field, lines, text_field, sniff: bool) -> Iterator[Record]:
    """`read_records`' records of an open stream."""
    if fmt == "conll":
        yield from _conll(_decoded_lines(stream), lines)
        return
    if fmt in ("tsv", "csv"):
        yield from _delimited(stream, "excel-tab" if fmt == "tsv" else "excel", path, id_field, text_field,
                              lines)
        return
    first = None  # the first line holding anything
    for number, text, error in _decoded_lines(stream, lines):
        first = first or (number if error or text.strip() else None)
        if error:
            yield Record(number, str(number), error=error)
            continue
        if not text.strip():
            continue
        if fmt == "text":
            if sniff:
                sniff = False
                _refuse_json_as_text(path, number, text)
            yield Record(number, str(number), {"text": text})
            continue
        try:
            value = json.loads(text, parse_int=_NumberLiteral, parse_float=_NumberLiteral,
                               parse_constant=_NonStandardConstant)
        except json.JSONDecodeError as err:
            if number == first and text.strip() == "[" and (lines is None or lines[0] <= 1):
                # json.dump(records, f, indent=2): a whole file of errors (a shard starts where it starts)
                raise NotText(f"line {number}: a JSON array, not JSON Lines (one object a line): write it with "
                              "to_json(orient='records', lines=True) or `jq -c '.[]'`") from None
            yield Record(number, str(number), error=f"malformed JSON ({_json_reason(err)})")
            continue
        except RecursionError:  # e.g. thousands of nested brackets
            yield Record(number, str(number), error="malformed JSON (nested too deeply)")
            continue
        if not isinstance(value, dict):
            yield Record(number, str(number), error=f"expected a JSON object, got {type(value).__name__}")
            continue
        yield _record(number, value, id_field)


def _refuse_json_as_text(path: str | Path, number: int, text: str) -> None:
    """UsageError where the first record of a stream read as plain text by default (standard input, a
    pipe: no file suffix) is a JSON object: JSONL that `--format jsonl` reads as records."""
    if not text.lstrip().startswith("{"):
        return
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return
    if isinstance(value, dict):
        name = "standard input" if str(path) == "-" else str(path)
        raise UsageError(f"{name}: line {number} is a JSON object, but a stream (no .jsonl suffix) is read as plain "
                         "text (one text a line): pass --format jsonl to read records, or --format text to take "
                         "such lines as texts")


def _json_reason(err: json.JSONDecodeError) -> str:
    """json's message with the column: some messages end in "at" already ("Unterminated string
    starting at"), which would read "starting at at column 10"."""
    return f"{err.msg} column {err.colno}" if err.msg.endswith(" at") else f"{err.msg} at column {err.colno}"


def _record(number: int, fields: dict, id_field: str | None) -> Record:
    """The record of `fields` on line `number`, its id read from `id_field` by `Record.get`'s rules;
    an error record (id: the line number) when it has none (see `read_records`)."""
    record = Record(number, str(number), fields)
    if id_field:
        try:
            record.id = record.get(id_field)
        except DataError as err:
            record.error = str(err).removeprefix(f"line {number}: ")
        if not record.id.strip():  # an empty CSV cell (or "") had been an id, where a missing one is an error
            record.id, record.error = str(number), f"field {id_field!r} is empty"
    return record


class _LineFeed:
    """The physical lines `csv.reader` pulls, decoded, and which of them the current row took.

    A row may span lines (a quoted field holding a newline), so where it starts and ends is
    known only here: `start()` before each row, then `first`/`last` are its lines, `error`
    the first undecodable line in it, `blank` whether it was one blank line (whitespace without
    the `delimiter`). A line that is
    not UTF-8 is handed on with its bad bytes replaced (they are never quotes, delimiters or
    newlines, so the parse stays in step and the rows after it read as they would).
    """

    def __init__(self, stream: BinaryIO, delimiter: str):
        self._lines = _raw_lines(stream)
        self._delimiter = delimiter
        self.start()

    def start(self) -> None:
        self.first = self.last = None
        self.error: str | None = None
        self.blank = True
        self.texts: list[str] = []  # the row's lines (a row of several: `_delimited` parses it again)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        number, raw = next(self._lines)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            text = raw.decode("utf-8", "replace")
            if self.error is None:
                reason = _utf8_reason(raw, err)  # the record's own line is named by its messages
                self.error = reason if self.first is None else reason.replace("at column", f"at line {number}, column")
        # A line of whitespace alone, not a row of empty cells: a TSV row "\t" strips to nothing too.
        self.blank = self.first is None and not text.strip() and self._delimiter not in text
        self.first = self.first or number
        self.last = number
        self.texts.append(text)
        return text  # with its newline: csv keeps a quoted field's newlines from it


def _delimited(stream: BinaryIO, dialect: str, path, id_field, text_field,
               shard: tuple[int, int] | None = None) -> Iterator[Record]:
    """TSV/CSV records, parsed by the csv module over the file's lines (so quoted fields may
    span lines); a record's line is the line it starts on. With `shard=(first, last)`, only
    the records starting on those lines: the lines before are still parsed (a record may
    run into the shard from before it), and reading goes past `last` to finish a record."""
    if csv.field_size_limit() < FIELD_LIMIT:
        csv.field_size_limit(FIELD_LIMIT)
    feed = _LineFeed(stream, csv.get_dialect(dialect).delimiter)
    reader = csv.reader(feed, dialect)
    header = None
    while True:
        feed.start()
        try:
            row, parse_error = next(reader, None), None
        except csv.Error as err:  # e.g. a stray carriage return in an unquoted field
            row, parse_error = [], err
        number = feed.first
        if number is None:  # end of the file
            break
        if header is not None and shard is not None and number > shard[1]:
            return
        if feed.blank or header is not None and shard is not None and number < shard[0]:
            continue
        row = row or []
        span = (f" (the row runs from line {number} to line {feed.last}: is a quote left open?)"
                if feed.last > number else "")
        if feed.error:
            if header is None:
                raise DataError(f"{path}: line {number}: header row is {feed.error}")
            # The row was still parsed (its bad bytes replaced): its id, where that cell is whole,
            # so that the error record does not take a line number another record has as its id.
            yield Record(number, _cell(row, header, id_field) or str(number), error=feed.error)
            continue
        if parse_error is not None:
            reason = str(parse_error)
            if "new-line" in reason:
                reason = "a carriage return in an unquoted field"
                if header is None:  # a file whose lines end in a carriage return alone is one line here
                    reason += ": are its lines ended by a carriage return alone? end them with a line feed"
            if "field limit" in reason and not span:
                span = " (is a quote left open?)"
            if header is None:
                raise DataError(f"{path}: line {number}: header row cannot be parsed ({reason}){span}")
            yield Record(number, str(number), error=f"malformed row ({reason}){span}")
            continue
        if header is None:
            header = [name.strip() for name in row]
            # Unnamed columns may repeat: Excel writes empty ones right of the data once their cells were
            # touched ("text,label,,"), and nothing reads them (the file had been refused for it).
            duplicates = sorted({n for n in header if n and header.count(n) > 1})
            if duplicates:
                raise DataError(f"{path}: line {number}: duplicate column {duplicates[0]!r} in the header")
            for role, name in (("text", text_field), ("id", id_field)):
                if name and name not in header:
                    raise UsageError(f"{path}: no {role} column {name!r} in the header "
                                     f"(columns: {', '.join(map(_shown, header))})")
            continue
        if span and dialect == "excel-tab" and not _parses_strictly(feed.texts, dialect):
            # A field that starts with a quote in TSV written without quoting (psql, mysql -B, cut) opens
            # one: the rows after it became part of its text, the record kept its columns and a wrong
            # label, exit 0. Its quote closes somewhere inside a later row, text following it, which a
            # field the csv module (or pandas) quoted never has: read strictly, such a row fails.
            yield Record(number, str(number), error=f"a quoted field holds whole rows, lines {number} to {feed.last} "
                                                    "(is a quote left open? In TSV written without quoting, a "
                                                    "field that starts with '\"' opens one)")
            continue
        if len(row) != len(header):
            yield Record(number, str(number),
                         error=f"expected {len(header)} columns ({', '.join(header)}), found {len(row)}{span}")
            continue
        yield _record(number, dict(zip(header, row)), id_field)
    if header is None:
        raise DataError(f"{path}: empty file (expected a header row)")


def _parses_strictly(lines: list[str], dialect: str) -> bool:
    """Whether a row's lines parse under `dialect` with csv's `strict` (a quote closed before other text)."""
    try:
        next(csv.reader(lines, dialect, strict=True), None)
    except csv.Error:
        return False
    return True


def _shown(name: str) -> str:
    """A column name as a message shows it: escaped where it holds characters that do not show (a
    second byte order mark, a zero-width space), which had made "no text column 'text' (columns:
    text, label)" look wrong."""
    return name if name.isprintable() else ascii(name)


def _cell(row: list[str], header: list[str] | None, name: str | None) -> str | None:
    """The `name` column of a row read with replaced bytes, unless the row is ragged or the cell
    holds a replaced byte (U+FFFD)."""
    if not name or not header or len(row) != len(header):
        return None
    value = row[header.index(name)]
    return None if "\ufffd" in value else value


def _conll(lines, shard: tuple[int, int] | None = None) -> Iterator[Record]:
    """Sentences of CoNLL-style lines (see the module docstring). A sentence with a bad line (not
    UTF-8, a single column) is one error record naming that line; the next sentence reads on.
    With `shard=(first, last)`, only the sentences starting on those lines."""
    words: list[str] = []
    tags: list[str] = []
    start, error = 0, None

    def sentence() -> Iterator[Record]:
        if start and (shard is None or shard[0] <= start <= shard[1]):
            yield (Record(error[0], str(error[0]), error=error[1]) if error
                   else Record(start, str(start), dict(zip(CONLL_FIELDS, (words, tags)))))

    for number, text, decode_error in lines:
        if shard is not None and not start and number > shard[1]:
            return
        if decode_error is None and not text.strip():
            yield from sentence()
            words, tags, start, error = [], [], 0, None
            continue
        start = start or number
        if error:
            continue
        columns = text.split() if decode_error is None else []
        if decode_error:
            error = (number, decode_error)
        elif columns[0] == "-DOCSTART-" and not words:
            start = 0  # CoNLL-2003's document marker: not a word
        elif len(columns) < 2:
            error = (number, f"expected a word and a tag separated by whitespace, found {text.strip()!r}")
        else:
            words.append(columns[0])
            tags.append(columns[-1])
    yield from sentence()


def read_parallel(source_file: str | Path, target_file: str | Path) -> Iterator[Record]:
    """Pairs of lines from two parallel text files as records with `source` and `target` fields.

    Blank lines are kept here (a blank line is a record) so that line numbers stay aligned;
    a length mismatch is a DataError naming both files.
    """
    with _open(source_file) as src, _open(target_file) as tgt:
        source_lines, target_lines = _named_lines(src, source_file), _named_lines(tgt, target_file)
        # zip_longest, not zip: zip drops the longer file's extra line and hides the mismatch.
        for source_line, target_line in itertools.zip_longest(source_lines, target_lines):
            if source_line is None or target_line is None:
                longer, lines = (target_file, target_lines) if source_line is None else (source_file, source_lines)
                count = (target_line or source_line)[0] - 1  # the lines both have
                extra, blank = 0, True  # counted, not held: the longer file may be long
                for _, text, _ in itertools.chain([target_line or source_line], lines):
                    extra, blank = extra + 1, blank and text is not None and not text.strip()
                raise DataError(f"{source_file} and {target_file} have different numbers of lines: {longer} has "
                                f"{count + extra}, the other {count}"
                                f"{' (its extra lines are blank: remove them)' if blank else ''}")
            (number, source, s_err), (_, target, t_err) = source_line, target_line
            error = s_err and f"{source_file}: {s_err}" or t_err and f"{target_file}: {t_err}"
            yield Record(number, str(number), {"source": source, "target": target}, error=error or None)


def _named_lines(stream: BinaryIO, path) -> Iterator[tuple[int, str | None, str | None]]:
    """`_decoded_lines` of one of several files: a NotText names the file."""
    try:
        yield from _decoded_lines(stream)
    except NotText as err:
        raise DataError(f"{path}: {err}") from None

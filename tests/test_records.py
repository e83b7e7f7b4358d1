"""The record readers (export/records.py): quoted fields spanning lines in TSV/CSV, byte order
marks, and the line numbers that error messages, ids, shards and --resume go by."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
from pathlib import Path

import pytest

import fake_predictor
from kerasllm.data_tasks import read_rows
from kerasllm.errors import DataError, UsageError
from kerasllm.export.predict import PREDICTORS
from kerasllm.export.records import read_parallel, read_records

BOM = b"\xef\xbb\xbf"


def write_rows(path: Path, rows: list[list[str]], dialect: str = "excel") -> Path:
    """`rows` as Python's csv module writes them (a field with a newline is quoted, newline kept)."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file, dialect).writerows(rows)
    return path


def lines_and_fields(path: Path, **kwargs) -> list[tuple[int, dict, str | None]]:
    return [(r.line, r.fields, r.error) for r in read_records(path, **kwargs)]


# -- quoted fields holding newlines ---------------------------------------------------------------
@pytest.mark.parametrize("suffix, dialect", [(".csv", "excel"), (".tsv", "excel-tab")])
def test_a_quoted_newline_is_part_of_its_field_and_the_record_keeps_its_first_line(tmp_path, suffix, dialect):
    path = write_rows(tmp_path / f"in{suffix}", [
        ["text", "label"],                          # line 1
        ["bad item", "negative"],                   # line 2
        ["great item\nreally good", "positive"],    # lines 3-4
        ["one\ntwo\r\nthree", "mixed"],             # lines 5-7 (a CRLF inside the field is kept too)
        ["after", "neutral"],                       # line 8
    ], dialect)
    assert lines_and_fields(path) == [
        (2, {"text": "bad item", "label": "negative"}, None),
        (3, {"text": "great item\nreally good", "label": "positive"}, None),
        (5, {"text": "one\ntwo\r\nthree", "label": "mixed"}, None),
        (8, {"text": "after", "label": "neutral"}, None),
    ]
    assert [r.id for r in read_records(path)] == ["2", "3", "5", "8"]


@pytest.mark.parametrize("suffix, dialect", [(".csv", "excel"), (".tsv", "excel-tab")])
def test_a_bad_record_after_a_multi_line_one_is_named_by_its_own_line(tmp_path, suffix, dialect):
    path = write_rows(tmp_path / f"in{suffix}", [
        ["text", "label"],
        ["great item\nreally good\nreally", "positive"],  # lines 2-4
        ["ragged"],                                       # line 5
        ["fine", "positive"],                             # line 6
    ], dialect)
    records = list(read_records(path))
    assert [(r.line, r.error) for r in records] == [
        (2, None), (5, "expected 2 columns (text, label), found 1"), (6, None)]
    with pytest.raises(DataError, match=r"^line 5: expected 2 columns \(text, label\), found 1$"):
        records[1].get("text")


def test_training_reads_multi_line_rows_and_names_the_physical_line_of_a_bad_one(tmp_path):
    rows = [["text", "label"]] + [["great item\nreally good" if i % 2 else "bad item",
                                   "positive" if i % 2 else "negative"] for i in range(40)]
    good = write_rows(tmp_path / "ml.csv", rows)
    read = read_rows(good, label_field="label")
    assert len(read) == 40 and read[1].text == "great item\nreally good" and read[1].where == f"{good}: line 3"
    bad = write_rows(tmp_path / "bad.csv", rows[:4] + [["", "positive"]])  # 1 + 1 + 2 + 1 lines before it
    with pytest.raises(DataError, match=r"bad\.csv: line 6: empty 'text' field"):
        read_rows(bad, label_field="label")


def test_undecodable_bytes_inside_and_after_a_multi_line_record_name_their_lines(tmp_path):
    path = tmp_path / "in.tsv"
    path.write_bytes(b'text\tlabel\n'
                     b'"first\nsec\xffond"\ta\n'   # lines 2-3, the bad byte on line 3
                     b'ok\tb\n'                    # line 4: read as it would be without line 3's byte
                     b'"x\ny"\tc\n'                # lines 5-6
                     b'\xc3(\td\n'                 # line 7
                     b'last\te\n')                 # line 8
    assert [(r.line, r.error) for r in read_records(path)] == [
        (2, "not valid UTF-8 (byte 0xff at line 3, column 4)"),
        (4, None),
        (5, None),
        (7, "not valid UTF-8 (byte 0xc3 at column 1)"),
        (8, None),
    ]
    header = tmp_path / "header.csv"
    header.write_bytes(b"te\xffxt\nok\n")
    with pytest.raises(DataError, match=r"line 1: header row is not valid UTF-8 \(byte 0xff at column 3\)"):
        list(read_records(header))


def test_a_quote_left_open_is_one_error_record_at_the_line_it_opens(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b'text,label\nok,a\n"never closed,b\nmore,c\n')
    records = list(read_records(path))
    assert [(r.line, r.error) for r in records] == [
        (2, None),
        (3, "expected 2 columns (text, label), found 1 (the row runs from line 3 to line 4: is a quote left open?)")]


def test_blank_lines_between_records_are_skipped_but_kept_inside_a_quoted_field(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b'\n\ntext,label\n\n"a\n\n  \nb",x\n \t\nc,y\n')
    assert lines_and_fields(path) == [(5, {"text": "a\n\n  \nb", "label": "x"}, None),
                                      (10, {"text": "c", "label": "y"}, None)]


def test_a_tsv_row_of_empty_cells_is_a_row_not_a_blank_line(tmp_path):
    """A TSV row of empty cells ("\t") strips to nothing and was skipped as a blank line: no error
    record, one output line fewer than the input's rows, where the same row in CSV (",") is one
    (fuzzing). A line of spaces alone is still blank in both."""
    tsv = tmp_path / "in.tsv"
    tsv.write_bytes(b"text\tlabel\ngood\ta\n\t\n  \nbad\tb\n")
    assert lines_and_fields(tsv) == [(2, {"text": "good", "label": "a"}, None), (3, {"text": "", "label": ""}, None),
                                     (5, {"text": "bad", "label": "b"}, None)]
    with pytest.raises(DataError, match=r"line 3: .*empty"):
        read_rows(tsv, "text", "label")


def test_json_nan_and_infinity_are_named_as_what_they_are(tmp_path):
    """`NaN`/`Infinity` (not JSON, but Python's json.dumps writes them) had been refused as "not a
    string (a float)", a type the file never wrote (fuzzing). In a field nobody reads they do no harm."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": NaN}\n{"text": "ok", "score": -Infinity}\n{"text": Infinity}\n')
    records = list(read_records(path))
    with pytest.raises(DataError) as err:
        records[0].get("text")
    assert str(err.value) == "line 1: field 'text' is NaN, which JSON does not allow (write a string or a number)"
    assert records[1].get("text") == "ok"
    with pytest.raises(DataError, match="^line 3: field 'text' is Infinity, which JSON does not allow"):
        records[2].get("text")


def test_shards_hold_the_records_that_start_in_them_whole(tmp_path):
    path = write_rows(tmp_path / "in.csv", [
        ["text"], ["a"], ["b\nc\nd"], ["e"], ["f\ng"], ["h"]])  # records on lines 2, 3-5, 6, 7-8, 9
    whole = lines_and_fields(path)
    assert [line for line, _, _ in whole] == [2, 3, 6, 7, 9]
    for blocks in ([(1, 3), (4, 6), (7, 9)], [(1, 4), (5, 7), (8, 9)], [(1, 2), (3, 3), (4, 5), (6, 9)]):
        shards = [lines_and_fields(path, lines=block) for block in blocks]
        assert sum(shards, []) == whole, blocks
    assert lines_and_fields(path, lines=(4, 5)) == []  # inside a record that starts on line 3
    assert lines_and_fields(path, lines=(3, 3)) == [(3, {"text": "b\nc\nd"}, None)]


# -- batch inference: ids, shards and --resume go by the record's first line ------------------------
@pytest.fixture
def bundle(tmp_path, monkeypatch):
    for task in fake_predictor.TASKS:
        monkeypatch.setitem(PREDICTORS, (task, "bundle"), "fake_predictor:load")
    return fake_predictor.make_bundle(tmp_path / "bundle", "generate", max_len=200)


def test_batch_job_on_multi_line_records_resumes_and_shards_to_the_same_output(run_cli, bundle, tmp_path):
    texts = [f"record {i}" + ("\nsecond line" * (i % 3)) for i in range(12)]
    source = write_rows(tmp_path / "in.csv", [["text"]] + [[t] for t in texts])
    whole = tmp_path / "whole.jsonl"
    assert run_cli("generate", bundle, "-i", source, "-o", whole).code == 0
    rows = [json.loads(line) for line in whole.read_text(encoding="utf-8").splitlines()]
    starts, line = [], 2
    for text in texts:
        starts.append(str(line))
        line += text.count("\n") + 1
    assert [row["id"] for row in rows] == starts
    assert [row["output"] for row in rows] == [t[::-1].upper() for t in texts]
    # Cut after 5 records, half a line torn off: --resume finishes it as one run would have.
    part = tmp_path / "part.jsonl"
    kept = whole.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(kept[:5]) + kept[5][:7])
    result = run_cli("generate", bundle, "-i", source, "-o", part, "--resume")
    assert result.code == 0 and "+5 already in the output" in result.err, result
    assert part.read_bytes() == whole.read_bytes()
    parts = []
    for index in range(3):
        out = tmp_path / f"shard{index}.jsonl"
        assert run_cli("generate", bundle, "-i", source, "-o", out, "--num-shards", 3, "--shard-index", index).code == 0
        parts.append(out.read_bytes())
    assert all(parts) and b"".join(parts) == whole.read_bytes()


# -- byte order marks ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, expected", [
    ("in.tsv", b"text\tlabel\nhi\tpos\n", [(2, {"text": "hi", "label": "pos"}, None)]),
    ("in.csv", b"text,label\r\nhi,pos\r\n", [(2, {"text": "hi", "label": "pos"}, None)]),
    ("in.jsonl", b'{"text": "hi"}\n{"text": "yo"}\n', [(1, {"text": "hi"}, None), (2, {"text": "yo"}, None)]),
    ("in.txt", b"hi\nyo\n", [(1, {"text": "hi"}, None), (2, {"text": "yo"}, None)]),
    ("in.conll", b"EU B-ORG\nrejects O\n", [(1, {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}, None)]),
])
def test_a_leading_byte_order_mark_is_dropped(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(BOM + content)
    assert lines_and_fields(path) == expected
    path.write_bytes(BOM + BOM + content)  # one is dropped: a second is the file's text (or bad JSON)
    assert lines_and_fields(path) != expected


def test_a_byte_order_mark_is_dropped_in_training_and_parallel_files(tmp_path):
    tsv = tmp_path / "bom.tsv"
    tsv.write_bytes(BOM + b"text\tlabel\n" + b"".join(b"row %d\tpos\n" % i for i in range(3)))
    assert [(row.where, row.text, row.label) for row in read_rows(tsv, label_field="label")][0] == \
        (f"{tsv}: line 2", "row 0", "pos")
    source, target = tmp_path / "src.txt", tmp_path / "tgt.txt"
    source.write_bytes(BOM + b"hello\n")
    target.write_bytes(BOM + b"bonjour\n")
    assert [r.fields for r in read_parallel(source, target)] == [{"source": "hello", "target": "bonjour"}]


def test_a_bad_byte_on_the_first_line_after_a_byte_order_mark_still_names_its_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(BOM + b"a\xffb\nok\n")
    assert [(r.line, r.error) for r in read_records(path)] == [
        (1, "not valid UTF-8 (byte 0xff at column 2)"), (2, None)]


# -- values JSON can hold and text cannot; ids as written -----------------------------------------
def test_a_lone_surrogate_is_an_error_record_and_the_job_goes_on(run_cli, bundle, tmp_path):
    r"""A JSON escape of half a surrogate pair ("\ud83d", an emoji cut in two) in a text or an id is
    an error record naming the line and field; the records around it are written. It had ended the
    job in a traceback (the tokenizer's TypeError, or the writer's UnicodeEncodeError for an id)
    and deleted the output, good records included."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "cut \\ud83d"}\n'
                      '{"id": "\\ud800", "text": "x"}\n{"id": "c", "text": "also fine"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--id-field", "id")
    assert result.code == 1 and "Traceback" not in result.err, result
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"id": "a", "output": "ENIF"},
        {"id": "b", "error": "line 2: field 'text' holds half of a surrogate pair (\\ud83d at character 5), "
                             "which is not text"},
        {"id": "3", "error": "line 3: field 'id' holds half of a surrogate pair (\\ud800 at character 1), "
                             "which is not text"},
        {"id": "c", "output": "ENIF OSLA"}]


def test_training_refuses_a_lone_surrogate_naming_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "good", "label": "a"}\n{"text": "bad \\udc00", "label": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: field 'text' holds half of a surrogate pair"):
        read_rows(path, "text", "label")


def test_json_number_ids_keep_their_literal(tmp_path):
    """`1.10` had become "1.1", and `1e2` and `100.0` the same id "100.0"; an int of 5,000 digits
    had ended the reader in a ValueError."""
    path = tmp_path / "in.jsonl"
    literals = ["1.10", "1e2", "100.0", "9007199254740993.0", "1e400", "-0", "1" * 5000]
    path.write_text("".join(f'{{"id": {n}, "text": "t"}}\n' for n in literals))
    records = list(read_records(path, id_field="id"))
    assert [(r.id, r.error) for r in records] == [(n, None) for n in literals]
    assert [type(r.id) for r in records] == [str] * len(literals)


def test_a_csv_row_with_a_bad_byte_keeps_its_own_id(tmp_path):
    """Its error record had taken the line number as its id: "3", which the next row has too."""
    path = tmp_path / "in.csv"
    path.write_bytes(b"id,text\n1,good\n2,bad \xff byte\n3,next\n\xff4,bad id\n")
    records = list(read_records(path, id_field="id"))
    assert [(r.line, r.id, r.error is None) for r in records] == [
        (2, "1", True), (3, "2", False), (4, "3", True), (5, "5", False)]  # a bad byte in the id: the line


def test_a_long_csv_field_is_read_whole(tmp_path):
    """A document over csv's default field limit (131,072 characters) had been an error record
    hinting at an open quote, where the same text in JSONL read fine."""
    text = "word " * 40_000
    path = write_rows(tmp_path / "in.csv", [["text"], [text], ["short"]])
    assert [(r.line, r.fields, r.error) for r in read_records(path)] == [
        (2, {"text": text}, None), (3, {"text": "short"}, None)]


def test_a_csv_with_carriage_return_line_ends_is_named_so(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b"text,label\rhi,pos\rho,neg\r")
    with pytest.raises(DataError, match="its lines end in a carriage return alone"):
        list(read_records(path))


# -- files that are not UTF-8 text as a whole ---------------------------------------------------------
TEXT = "Great product, works well\nTerrible, broke at once\n"
NOT_TEXT = {  # name: (bytes, what the one-line refusal names)
    "utf16.txt": (TEXT.encode("utf-16"), "UTF-16"),  # Excel's "Unicode Text": a byte order mark
    "utf16le.txt": (TEXT.encode("utf-16-le"), "UTF-16"),  # bcp -w, .NET's Encoding.Unicode: none
    "utf16be.jsonl": ('{"text": "hi"}\n'.encode("utf-16-be"), "UTF-16"),
    "utf16.tsv": ("text\tlabel\r\nhi\tpos\r\n".encode("utf-16-le"), "UTF-16"),
    "in.txt.gz": (gzip.compress(TEXT.encode()), "gzip-compressed"),
    "in.jsonl.gz": (gzip.compress(b'{"text": "hi"}\n'), "gzip-compressed"),
    "in.csv.bz2": (bz2.compress(b"text,label\nhi,pos\n"), "bzip2-compressed"),
    "in.txt.xz": (lzma.compress(TEXT.encode()), "xz-compressed"),
    "mac.txt": (TEXT.replace("\n", "\r").encode(), "carriage return alone"),  # classic Mac OS line ends
    "mac.jsonl": (b'{"text": "a"}\r{"text": "b"}\r', "carriage return alone"),
    "array.json": (json.dumps([{"text": "a", "label": "x"}], indent=2).encode(), "a JSON array, not JSON Lines"),
}


@pytest.mark.parametrize("name", NOT_TEXT)
def test_a_file_that_is_not_utf8_text_is_refused_before_any_record(tmp_path, name):
    """UTF-16 had read as text with a NUL between characters (only the byte order mark's line failed: every
    other record got a confident label, exit 0 without one); a gzip file as lines of deflate fragments
    (26,349 records of a 100,000-line file, 84 of them classified); a file with carriage-return line ends
    as one record; a pretty-printed JSON array as an error per line. Training and batch reading alike."""
    content, reason = NOT_TEXT[name]
    path = tmp_path / name
    path.write_bytes(content)
    fmt = "tsv" if ".tsv" in name else "csv" if ".csv" in name else "jsonl" if ".json" in name else "text"
    with pytest.raises(DataError, match=f"^{path}: line 1: .*{reason}"):
        list(read_records(path, fmt))
    with pytest.raises(DataError, match=reason):
        read_rows(path, fmt=fmt)


def test_utf8_text_with_nul_bytes_or_a_crlf_or_a_lone_carriage_return_later_is_still_text(tmp_path):
    """The checks look at the file's start: NUL bytes here and there, CRLF ends, and a carriage return on a
    later line are read as before."""
    path = tmp_path / "in.txt"
    path.write_bytes(b"first\x00 li\rn\re\r\nsecond line\r\nthird\rfourth\n")  # stray CRs in a file with LFs
    assert [r.fields["text"] for r in read_records(path)] == ["first\x00 li\rn\re", "second line", "third\rfourth"]
    path.write_bytes("a\nb\n".encode("utf-16-le"))  # one character on line 1 is enough to tell UTF-16
    with pytest.raises(DataError, match="UTF-16"):
        list(read_records(path))
    path.write_bytes(b'{"text": "a"}\n[\n{"text": "b"}\n')  # a stray "[": an error record, in a shard that starts
    for lines in (None, (2, 3)):                              # on it too (it had stopped that shard's job)
        assert [(r.line, r.error is None) for r in read_records(path, "jsonl", lines=lines)][-2:] == [(2, False),
                                                                                                    (3, True)]


def test_parallel_files_name_the_file_that_is_not_text_and_count_the_lines_they_differ_by(tmp_path):
    source, target = tmp_path / "p.src", tmp_path / "p.tgt"
    source.write_text("one\ntwo\nthree\n")
    target.write_bytes("eins\nzwei\ndrei\n".encode("utf-16"))
    with pytest.raises(DataError, match=f"^{target}: line 1: UTF-16"):
        list(read_parallel(source, target))
    target.write_text("eins\nzwei\n")
    with pytest.raises(DataError, match=f"different numbers of lines: {source} has 3, the other 2$"):
        list(read_parallel(source, target))
    target.write_text("eins\nzwei\ndrei\n\n \n")
    with pytest.raises(DataError, match=f"{target} has 5, the other 3 \\(its extra lines are blank: remove them\\)"):
        list(read_parallel(source, target))


def test_a_tsv_field_holding_whole_rows_is_an_error_record_naming_its_lines(tmp_path):
    """TSV written without quoting (psql, mysql -B, cut) with a text that starts with a quote: the rows after
    it had become part of its text under its label, exit 0. A CSV field with commas and a newline (an
    address) is text."""
    path = tmp_path / "in.tsv"
    path.write_text('text\tlabel\n"Best ever, she said\tpositive\nbroken\tnegative\nit "works" fine\tpositive\n'
                    "after\tnegative\n")
    records = list(read_records(path))
    assert [(r.line, r.error is not None) for r in records] == [(2, True), (5, False)]
    assert "a quoted field holds whole rows, lines 2 to 4 (is a quote left open?" in records[0].error
    with pytest.raises(DataError, match=f"{path}: line 2: a quoted field holds whole rows"):
        read_rows(path, label_field="label")
    csv_path = write_rows(tmp_path / "in.csv", [["text", "label"], ["12 Main St, Springfield\nUSA", "home"]])
    assert [r.fields["text"] for r in read_records(csv_path)] == ["12 Main St, Springfield\nUSA"]
    quoted = write_rows(tmp_path / "quoted.tsv", [["text", "label"], ["a cell\twith a tab\nand a line end", "x"],
                                                  ["next", "y"]], dialect="excel-tab")  # as csv and pandas write it
    assert [r.fields["text"] for r in read_records(quoted)] == ["a cell\twith a tab\nand a line end", "next"]


def test_excels_empty_columns_right_of_the_data_are_read_past(tmp_path):
    """Excel writes "text,label,," once cells right of the data were touched: refused as a duplicate column."""
    path = tmp_path / "in.csv"
    path.write_bytes(b"text,label,,\r\ngood thing,pos,,\r\nbad thing,neg,,\r\n")
    assert [(r.fields["text"], r.fields["label"]) for r in read_records(path)] == [("good thing", "pos"),
                                                                                  ("bad thing", "neg")]
    path.write_bytes(b"text,label,label\nx,y,z\n")
    with pytest.raises(DataError, match="duplicate column 'label'"):
        list(read_records(path))


def test_a_column_name_with_characters_that_do_not_show_is_escaped_in_messages(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(BOM + BOM + b"text,label\ngood,pos\n")  # a second byte order mark is part of the name
    with pytest.raises(UsageError, match=r"columns: '\\ufefftext', label\)"):
        list(read_records(path, text_field="text"))


def test_a_text_field_for_plain_text_input_is_a_usage_error(run_cli, bundle, tmp_path):
    """Plain text has one field; `--text-field foo` had made every line an error record
    ("missing field 'foo' (fields: text)") where TSV/CSV refuse the column up front."""
    source = tmp_path / "prompts.txt"
    source.write_text("one\ntwo\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--text-field", "foo")
    assert result.code == 2 and not out.exists(), result
    assert "plain text input is one text a line, field 'text'; a text field ('foo') needs JSONL" in result.err
    assert run_cli("generate", bundle, "-i", source, "-o", out, "--text-field", "text").code == 0


# -- a closed standard input ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".tsv", ".conll"])
def test_a_file_is_read_to_its_end_with_standard_input_closed(tmp_path, monkeypatch, suffix):
    """With fd 0 closed (`cmd <&-`, daemons, job runners) `sys.stdin` is None: the reader's cleanup
    after the last record had raised AttributeError (every batch job lost its last window and could
    never finish, and `evaluate` and `train classifier` failed). Reading `-` is then one line."""
    from kerasllm.errors import UsageError

    content = {".txt": "a\nb\n", ".jsonl": '{"text": "a"}\n{"text": "b"}\n', ".tsv": "text\na\nb\n",
               ".conll": "a X\n\nb Y\n"}[suffix]
    path = tmp_path / f"in{suffix}"
    path.write_text(content)
    monkeypatch.setattr("sys.stdin", None)
    assert len(list(read_records(path))) == 2
    with pytest.raises(UsageError, match="^standard input is closed: pass --input FILE$"):
        list(read_records("-"))


def test_json_lines_in_a_stream_are_not_read_as_plain_text(tmp_path, monkeypatch):
    """`zcat x.jsonl.gz | kerasllm classify ...`: every JSON line had been classified as the text it spells, exit 0."""
    import io
    import os
    import sys
    import threading

    from kerasllm.errors import UsageError

    rows = b'\n{"text": "a good movie", "label": "positive"}\n{"text": "bad"}\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(rows)))
    with pytest.raises(UsageError, match=r"standard input: line 2 is a JSON object, but a stream \(no \.jsonl "
                                         r"suffix\) is read as plain text .*: pass --format jsonl"):
        list(read_records("-"))
    fifo = tmp_path / "piped"  # as /dev/fd/63 from `<(...)`
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(rows * 2), daemon=True)
    writer.start()
    with pytest.raises(UsageError, match=r"piped: line 2 is a JSON object"):
        list(read_records(fifo))
    writer.join(timeout=10)
    for name in ("corpus", "notes.txt"):  # a file is plain text whatever it holds: a corpus may start with anything
        (tmp_path / name).write_bytes(rows)
        assert len(list(read_records(tmp_path / name))) == 2
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(rows)))
    assert len(list(read_records("-", "text"))) == 2  # said so: texts
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"{not json}\n{}x\n")))
    assert [r.fields["text"] for r in read_records("-")] == ["{not json}", "{}x"]


def test_an_empty_id_is_an_error_record_as_a_missing_one_is(tmp_path):
    """An empty CSV cell had been taken as the id "" (a JSONL record without its id is an error record)."""
    (tmp_path / "in.csv").write_text('id,text\n,"empty id"\n7,ok\n')
    (tmp_path / "in.jsonl").write_text('{"id": " ", "text": "a"}\n{"id": 8, "text": "b"}\n')
    for name, good in (("in.csv", "7"), ("in.jsonl", "8")):
        bad, kept = read_records(tmp_path / name, id_field="id")
        assert (bad.id, bad.error) == (str(bad.line), "field 'id' is empty") and (kept.id, kept.error) == (good, None)


def test_a_dotted_field_name_reaches_into_nested_json_as_hugging_face_exports_write_it(tmp_path):
    """`{"translation": {"en": ..., "de": ...}}` (datasets' to_json) had no field name to reach its texts;
    `ner_tags` written as class ids were "not a list of strings"."""
    from kerasllm.data_tasks import read_tagged
    from kerasllm.pairs import read_pairs

    path = tmp_path / "wmt.jsonl"
    path.write_text('{"id": 7, "translation": {"en": "two", "de": "zwei"}}\n'
                    '{"translation.en": "a literal key wins", "translation": {"en": "x", "de": "y"}}\n'
                    '{"translation": {"en": "one"}}\n')
    records = list(read_records(path))
    assert records[0].get("translation.de") == "zwei" and records[1].get("translation.en") == "a literal key wins"
    with pytest.raises(DataError, match=r"line 3: missing field 'translation.de' \(fields: translation\)"):
        records[2].get("translation.de")
    with pytest.raises(DataError, match="line 1: field 'translation' is not a string"):
        records[0].get("translation")
    with pytest.raises(DataError, match="line 3: missing field 'translation.de'"):
        read_pairs(path, source_field="translation.en", target_field="translation.de")
    path.write_text('{"translation": {"en": "two", "de": "zwei"}}\n' * 2)
    assert [(p.source, p.target) for p in read_pairs(path, source_field="translation.en",
                                                     target_field="translation.de")] == [("two", "zwei")] * 2
    ner = tmp_path / "ner.jsonl"
    ner.write_text('{"tokens": ["Paris", "is", "big"], "ner_tags": [5, 0, 0]}\n')
    assert [row.tags for row in read_tagged(ner, tags_field="ner_tags")] == [["5", "0", "0"]]


def test_tag_reads_a_dotted_field_as_classify_does(tmp_path):
    """`kerasllm tag --text-field review.text` had made every record "missing field" (its own lookup)."""
    from kerasllm.export import batch

    path = tmp_path / "in.jsonl"
    path.write_text('{"doc": {"tokens": ["Ben", "runs"]}, "review": {"text": "Ben runs"}}\n')
    record = next(read_records(path))
    runner = batch.BatchRunner.__new__(batch.BatchRunner)
    runner.tokens_field, runner.text_field = "doc.tokens", "review.text"
    assert runner._input(record) == ["Ben", "runs"]
    runner.tokens_field = "doc.words"
    assert runner._input(record) == "Ben runs"

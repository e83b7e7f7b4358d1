"""`kerasllm sample-data` writes the format its --out suffix names, and refuses one the kind cannot
produce (it had written JSON lines into a .csv, a ner .tsv, and plain text into a corpus .jsonl)."""

import pytest

from kerasllm import datasets
from kerasllm.export.records import read_records


@pytest.mark.parametrize("kind, name, fields", [
    ("numbers", "n.jsonl", ("source", "target")),
    ("numbers", "n.tsv", ("source", "target")),
    ("numbers", "n.csv", ("source", "target")),
    ("sentiment", "s.jsonl", ("text", "label")),
    ("sentiment", "s.tsv", ("text", "label")),
    ("sentiment", "s.csv", ("text", "label")),
])
def test_rows_are_written_in_the_format_of_the_suffix(run_cli, tmp_path, kind, name, fields):
    path = tmp_path / name
    assert run_cli("sample-data", kind, "--out", path, "--count", 40, "--seed", 3).code == 0
    records = list(read_records(path))  # the format picked by the suffix, as training picks it
    expected = (datasets.number_words_pairs(40, seed=3) if kind == "numbers" else datasets.sentiment_rows(40, seed=3))
    assert [r.error for r in records if r.error] == []
    assert [tuple(r.get(f) for f in fields) for r in records] == expected
    if kind == "sentiment":
        assert any("," in text for text, _ in expected)  # CSV quoting exercised


@pytest.mark.parametrize("name", ["ner.jsonl", "ner.conll"])
def test_ner_sentences_are_written_in_the_format_of_the_suffix(run_cli, tmp_path, name):
    path = tmp_path / name
    assert run_cli("sample-data", "ner", "--out", path, "--count", 20, "--seed", 3).code == 0
    records = list(read_records(path))
    assert [(r.words("tokens"), r.words("tags")) for r in records] == datasets.ner_rows(20, seed=3)


def test_the_corpus_is_plain_text(run_cli, tmp_path):
    path = tmp_path / "corpus.txt"
    assert run_cli("sample-data", "corpus", "--out", path, "--count", 5, "--seed", 3).code == 0
    assert path.read_text(encoding="utf-8") == datasets.sample_corpus(5, seed=3)


@pytest.mark.parametrize("kind, name, suffixes", [
    ("sentiment", "sent.txt", ".jsonl, .tsv, .csv"),
    ("numbers", "pairs.conll", ".jsonl, .tsv, .csv"),
    ("ner", "x.tsv", ".jsonl, .conll"),
    ("ner", "x.csv", ".jsonl, .conll"),
    ("corpus", "c.jsonl", ".txt, .text, .md, .raw"),
    ("corpus", "corpus", ".txt, .text, .md, .raw"),
])
def test_a_suffix_the_kind_cannot_produce_is_refused(run_cli, tmp_path, kind, name, suffixes):
    result = run_cli("sample-data", kind, "--out", tmp_path / name)
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kerasllm: error: Invalid value for '--out': "), result.err
    assert f"{name}: a {kind} sample can be written as {suffixes} " in lines[0], result.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("count", ["0", "-1"])
def test_count_must_be_positive(run_cli, tmp_path, count):
    result = run_cli("sample-data", "sentiment", "--out", tmp_path / "s.jsonl", "--count", count)
    assert result.code == 2, result
    assert f"Invalid value for '--count': {count} is not in the range x>=1" in result.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind, name", [  # as the README, samples/*.py and tests run it
    ("corpus", "corpus.txt"), ("sentiment", "reviews.tsv"), ("sentiment", "test.jsonl"), ("ner", "ner.jsonl"),
    ("ner", "ner-test.conll"), ("numbers", "pairs.tsv"), ("numbers", "numbers.jsonl"),
])
def test_the_documented_commands_still_work(run_cli, tmp_path, kind, name):
    assert run_cli("sample-data", kind, "--out", tmp_path / "sub" / name, "--count", 3).code == 0
    assert (tmp_path / "sub" / name).stat().st_size > 0


def test_an_existing_file_is_kept_unless_overwrite_is_given(run_cli, tmp_path):
    """It had been replaced silently (a user's own reviews.tsv lost): refused as every other writer
    refuses an existing output, in one line with exit 2; --overwrite replaces it."""
    path = tmp_path / "reviews.tsv"
    path.write_text("text\tlabel\nmy own precious row\tpositive\n", encoding="utf-8")
    refused = run_cli("sample-data", "sentiment", "--out", path, "--count", 3)
    assert refused.code == 2, refused
    assert refused.err.splitlines() == [f"kerasllm: error: {path} exists: add --overwrite to replace it"], refused.err
    assert path.read_text(encoding="utf-8") == "text\tlabel\nmy own precious row\tpositive\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.tsv"]  # no partial file left either
    assert run_cli("sample-data", "sentiment", "--out", path, "--count", 3, "--overwrite").code == 0
    assert [r.get("text") for r in read_records(path)] == [text for text, _ in datasets.sentiment_rows(3)]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial(run_cli, tmp_path, monkeypatch):
    """It had said "[Errno 28] No space left on device" of no file and left `.corpus.txt.partial`."""
    from pathlib import Path

    def full(self, *args, **kwargs):
        Path.write_bytes(self, b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "corpus.txt"
    result = run_cli("sample-data", "corpus", "--out", out, "--count", "5")
    assert (result.code, result.err.splitlines()) == (1, [
        f"kerasllm: error: {out}: cannot write the sample data (No space left on device)"]), result
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_file_system_is_one_line_naming_the_file(run_cli, tmp_path, monkeypatch):
    """There the partial file's removal fails too (EROFS, not ENOENT): it had escaped as
    "[Errno 30] Read-only file system: '.corpus.txt.partial'", a name the user never gave."""
    from pathlib import Path

    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    out = tmp_path / "corpus.txt"
    result = run_cli("sample-data", "corpus", "--out", out, "--count", "5")
    assert (result.code, result.err.splitlines()) == (1, [
        f"kerasllm: error: {out}: cannot write the sample data (Read-only file system)"]), result

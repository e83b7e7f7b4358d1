"""Batch inference CLI (`kerasllm generate|classify|embed|translate`) on a fake predictor.

The predictor is tests/fake_predictor.py (deterministic, per-record results, no model), so
these tests pin the machinery: formats, order under bucketing, token budgets, error records,
resume after a kill, shards, signals, reader fuzzing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fake_predictor
from kerasllm.errors import DataError
from kerasllm.export import batch, records
from kerasllm.export.predict import PREDICTORS
from kerasllm.export.records import read_records

FAKE = Path(fake_predictor.__file__)
REPO = FAKE.parent.parent


@pytest.fixture(autouse=True)
def fake_predictors(monkeypatch):
    for task in fake_predictor.TASKS:
        monkeypatch.setitem(PREDICTORS, (task, "bundle"), "fake_predictor:load")
    fake_predictor.FakePredictor.batches.clear()
    fake_predictor.FakePredictor.handovers.clear()
    fake_predictor.FakePredictor.devices.clear()


@pytest.fixture
def bundle(tmp_path):
    return fake_predictor.make_bundle(tmp_path / "bundle", "generate")


def expected(text: str, max_new_tokens: int = 64) -> str:
    return text[::-1].upper()[:max_new_tokens]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def mixed_texts(n: int) -> list[str]:
    """Texts of lengths 1..39 in a scrambled order (deterministic)."""
    return [f"t{i}" + "x" * ((i * 7919) % 36) for i in range(n)]


# -- batch planning ----------------------------------------------------------------------------
def test_plan_batches_respects_count_and_token_budget_and_buckets():
    lengths = [(i * 37) % 50 + 1 for i in range(200)]
    plan = batch.plan_batches(lengths, batch_size=16, max_batch_tokens=300, bucket=True, extra_tokens=4)
    assert sorted(i for b in plan for i in b) == list(range(200))  # every item exactly once
    for b in plan:
        assert len(b) <= 16
        assert len(b) * (max(lengths[i] for i in b) + 4) <= 300 or len(b) == 1
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    unbucketed = batch.plan_batches(lengths, batch_size=16, max_batch_tokens=300, bucket=False, extra_tokens=4)
    padded_off = sum(len(b) * max(lengths[i] for i in b) for b in unbucketed)
    assert padded < 0.7 * padded_off, (padded, padded_off)  # bucketing computes far less padding
    # an item over the budget on its own still gets a batch
    assert batch.plan_batches([500, 2], batch_size=8, max_batch_tokens=100) == [[1], [0]]


# -- formats -----------------------------------------------------------------------------------
FORMAT_FILES = {
    "text": ("in.txt", "hello\n\nworld wide\n", [("1", "hello"), ("3", "world wide")]),
    "jsonl": ("in.jsonl", '{"key": "a", "prompt": "hello"}\n{"key": 7, "prompt": "world wide"}\n',
              [("a", "hello"), ("7", "world wide")]),
    "tsv": ("in.tsv", "key\tprompt\na\thello\nb\tworld wide\n", [("a", "hello"), ("b", "world wide")]),
    "csv": ("in.csv", 'key,prompt\na,hello\nb,"world, wide"\n', [("a", "hello"), ("b", "world, wide")]),
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_FILES))
def test_every_input_format(run_cli, bundle, tmp_path, fmt):
    name, content, records = FORMAT_FILES[fmt]
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    fields = [] if fmt == "text" else ["--text-field", "prompt", "--id-field", "key"]
    result = run_cli("generate", bundle, "--input", source, "--output", out, *fields, "--max-new-tokens", 5)
    assert result.code == 0, result
    assert read_jsonl(out) == [{"id": rid, "output": expected(text, 5)} for rid, text in records]
    assert "2 records, 0 errors" in result.err


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
@pytest.mark.parametrize("option,role", [("--id-field", "id"), ("--text-field", "text")])
def test_a_column_missing_from_the_header_is_a_usage_error_before_anything_runs(run_cli, tmp_path, suffix, option,
                                                                                role):
    """The header names the columns up front: a misspelt --id-field was ignored (ids silently line
    numbers) and a misspelt --text-field gave an error record for every line."""
    bundle = fake_predictor.make_bundle(tmp_path / "b", "classify")
    sep = "," if suffix == ".csv" else "\t"
    source = tmp_path / f"in{suffix}"
    source.write_text(f"review{sep}id\ngood lamp{sep}a1\n")
    out = tmp_path / "out.jsonl"
    fields = {"--id-field": ["--text-field", "review", "--id-field", "idx"], "--text-field": ["--text-field", "txt"]}
    result = run_cli("classify", bundle, "-i", source, "-o", out, *fields[option])
    assert result.code == 2, result
    missing = "idx" if role == "id" else "txt"
    assert result.err.splitlines() == [
        f"kerasllm: error: {source}: no {role} column {missing!r} in the header (columns: review, id)"]
    assert not out.exists()
    assert fake_predictor.FakePredictor.devices == []  # refused before the model loaded
    result = run_cli("classify", bundle, "-i", source, "-o", out, "--text-field", "review", "--id-field", "id")
    assert result.code == 0 and read_jsonl(out)[0]["id"] == "a1", result


def test_a_jsonl_record_without_its_id_is_an_error_record_as_one_without_its_text(run_cli, bundle, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"key": "a", "text": "x"}\n{"text": "y"}\n{"key": null, "text": "z"}\n'
                      '{"key": ["b"], "text": "w"}\n{"key": 7, "text": "v"}\n{"key": "c"}\n')
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--id-field", "key", "-q")
    assert result.code == 1, result
    assert read_jsonl(out) == [
        {"id": "a", "output": "X"},
        {"id": "2", "error": "line 2: missing field 'key' (fields: text)"},
        {"id": "3", "error": "line 3: field 'key' is null"},
        {"id": "4", "error": "line 4: field 'key' is not a string (a list)"},
        {"id": "7", "output": "V"},
        {"id": "c", "error": "line 6: missing field 'text' (fields: key)"},
    ]


def test_an_id_field_for_plain_text_input_is_a_usage_error(run_cli, bundle, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("hello\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--id-field", "key")
    assert result.code == 2 and "text input has no fields to hold an id ('key')" in result.err, result
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_an_empty_input_is_an_error_and_leaves_no_output(run_cli, bundle, tmp_path, content):
    source = tmp_path / "empty.txt"
    source.write_bytes(content)
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "-q")
    assert result.code == 1, result
    assert f"{source}: no records to process" in result.err and "Traceback" not in result.err
    assert not out.exists()
    assert fake_predictor.FakePredictor.devices == []  # said before the model loaded


def test_an_empty_standard_input_is_an_error_before_the_model_loads(bundle):
    (bundle / "manifest.json").write_text('{"task": "generate"}')  # a model that would fail to load
    proc = subprocess.run([sys.executable, str(FAKE), "generate", str(bundle), "-q"], input="\n\n",
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["kerasllm: error: standard input: no records to process "
                                        "(the input is empty or holds only blank lines)"], proc.stderr


def test_a_failed_write_names_the_output(run_cli, bundle, tmp_path):
    """A full disk (here /dev/full) said only "[Errno 28] No space left on device"."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    source = tmp_path / "in.txt"
    source.write_text("abc\nde\n")
    result = run_cli("generate", bundle, "-i", source, "-o", "/dev/full", "-q")
    assert result.code == 1, result
    assert result.err.splitlines() == ["kerasllm: error: /dev/full: cannot write the output (No space left on device)"]


def test_stdin_to_stdout_and_explicit_format(bundle, tmp_path):
    proc = subprocess.run([sys.executable, str(FAKE), "generate", str(bundle), "--format", "jsonl", "-q"],
                          input='{"text": "abc"}\n{"text": "de"}\n', capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [{"id": "1", "output": "CBA"},
                                                                       {"id": "2", "output": "ED"}]
    assert proc.stderr == ""  # --quiet


@pytest.mark.parametrize("task,options,check", [
    ("classify", ["--top-k", "1"], lambda row: row["label"] in row["scores"] and len(row["scores"]) == 1),
    ("embed", ["--normalize"], lambda row: abs(sum(v * v for v in row["embedding"]) - 1) < 1e-9),
    ("translate", ["--n-best", "2", "--num-beams", "2"], lambda row: len(row["output"]) == 2 and "scores" in row),
])
def test_other_tasks_write_their_fields(run_cli, tmp_path, task, options, check):
    bundle = fake_predictor.make_bundle(tmp_path / "b", task)
    source = tmp_path / "in.txt"
    source.write_text("short\na much longer text\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(task, bundle, "-i", source, "-o", out, *options)
    assert result.code == 0, result
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["1", "2"] and all(check(r) for r in rows), rows


def test_wrong_task_for_source_is_a_usage_error(run_cli, tmp_path):
    bundle = fake_predictor.make_bundle(tmp_path / "b", "embed")
    PREDICTORS.pop(("generate", "bundle"))
    source = tmp_path / "in.txt"
    source.write_text("x\n")
    result = run_cli("generate", bundle, "-i", source, "-o", tmp_path / "o.jsonl")
    assert result.code == 2 and "no generate predictor for a bundle of task 'embed'" in result.err


# -- order, budgets ----------------------------------------------------------------------------
def test_order_kept_under_bucketing_and_batches_follow_the_budget(run_cli, bundle, tmp_path):
    texts = mixed_texts(300)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--batch-size", 8, "--max-batch-tokens", 200,
                     "--max-new-tokens", 10, "--window", 64)
    assert result.code == 0, result
    assert read_jsonl(out) == [{"id": str(i + 1), "output": expected(t, 10)} for i, t in enumerate(texts)]
    seen = fake_predictor.FakePredictor.batches
    assert sum(map(len, seen)) == 300
    assert all(len(b) <= 8 and (len(b) * (max(b) + 10) <= 200 or len(b) == 1) for b in seen)
    # bucketed: within a batch lengths differ little (the input order scrambles lengths 2..40)
    spread = sum(max(b) - min(b) for b in seen) / len(seen)
    assert spread < 4, spread


def test_no_bucket_keeps_input_order_in_batches(run_cli, bundle, tmp_path):
    texts = mixed_texts(40)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.jsonl"
    assert run_cli("generate", bundle, "-i", source, "-o", out, "--no-bucket", "--batch-size", 8).code == 0
    seen = fake_predictor.FakePredictor.batches
    assert [n for b in seen for n in b] == [len(t) for t in texts]
    assert [r["output"] for r in read_jsonl(out)] == [expected(t) for t in texts]


def test_streaming_holds_at_most_one_window_of_records(bundle, tmp_path):
    """Memory does not grow with the input: never more than `window` records read ahead of the output."""
    class CountingWriter(batch.JsonlWriter):
        lines = 0

        def write(self, rows):
            rows = list(rows)
            CountingWriter.lines += len(rows)
            super().write(rows)

    read, ahead = [0], []

    def records():
        for i, text in enumerate(mixed_texts(2000)):
            ahead.append(read[0] - CountingWriter.lines)
            read[0] += 1
            yield batch.Record(i + 1, str(i + 1), {"text": text})

    writer = CountingWriter(tmp_path / "out.jsonl")
    summary = batch.BatchRunner(fake_predictor.load(bundle), {"max_new_tokens": 4}, batch_size=8, window=50).run(
        records(), writer)
    writer.close()
    assert summary.records == CountingWriter.lines == 2000
    assert max(ahead) <= 50, max(ahead)


def test_device_reaches_the_predictor_and_no_tensorflow_is_imported(bundle, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("abc\n")
    proc = subprocess.run([sys.executable, "-X", "importtime", str(FAKE), "generate", str(bundle), "-i", str(source),
                           "-q", "--device", "cuda:1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"id": "1", "output": "CBA"}, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert "kerasllm" in imported and "tqdm" in imported
    assert not imported & {"tensorflow", "keras", "keras_hub", "tf2onnx"}, imported & {"tensorflow", "keras"}


def test_device_option_is_passed_in_process(run_cli, bundle, tmp_path):
    """(auto, which --help offers, had been refused as not cpu, cuda or cuda:N.)"""
    source = tmp_path / "in.txt"
    source.write_text("abc\n")
    assert run_cli("generate", bundle, "-i", source, "-o", tmp_path / "o.jsonl", "--device", "cuda").code == 0
    assert fake_predictor.FakePredictor.devices == ["cuda"]
    assert run_cli("generate", bundle, "-i", source, "-o", tmp_path / "o2.jsonl", "--device", "auto").code == 0
    assert fake_predictor.FakePredictor.devices[-1] == "auto"
    result = run_cli("generate", bundle, "-i", source, "-o", tmp_path / "o3.jsonl", "--device", "auto:1")
    assert result.code == 2 and "expected cpu, cuda, cuda:N or auto" in result.err


# -- bad records -------------------------------------------------------------------------------
def test_each_bad_record_becomes_an_error_record_and_the_rest_succeed(run_cli, bundle, tmp_path):
    source = tmp_path / "in.jsonl"
    lines = [
        b'{"text": "good one"}',
        b'{"text": ""}',                           # 2 empty text
        b'{"text": "caf\xe9"}',                   # 3 undecodable bytes (latin-1)
        b'{"text": "' + b"y" * 60 + b'"}',         # 4 longer than the model allows (40)
        b'{"prompt": "no text field"}',            # 5 missing field
        b'{"text": "unterminated',                 # 6 malformed JSON
        b'["not", "an object"]',                   # 7 not an object
        b'{"text": "boom"}',                       # 8 the model fails on it (inside a batch)
        b'{"text": "good two"}',
    ]
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out)
    assert result.code == 1, result
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [str(i) for i in range(1, 10)]
    assert rows[0] == {"id": "1", "output": "ENO DOOG"} and rows[8] == {"id": "9", "output": "OWT DOOG"}
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert sorted(errors, key=int) == [str(i) for i in range(2, 9)]
    assert errors["2"] == "line 2: empty text"
    assert errors["3"].startswith("line 3: not valid UTF-8 (byte 0xe9")
    assert errors["4"].startswith("line 4: text of 60 tokens is longer than the 40")
    assert errors["5"].startswith("line 5: missing field 'text'")
    assert errors["6"].startswith("line 6: malformed JSON")
    assert errors["7"] == "line 7: expected a JSON object, got list"
    assert errors["8"] == "line 8: the model failed on this text"
    assert "7 errors" in result.err and "7 record(s) failed" in result.err
    assert "warning: line 3: not valid UTF-8" in result.err


def test_a_text_field_that_is_not_a_string_is_an_error_record(run_cli, bundle, tmp_path):
    """A list or object has no one text (it was used as its JSON, `["a", "b"]`); null is named as
    null (it read "missing field 'text' (fields: text)"). A number is taken as its literal, as a
    label or seq2seq target written as a number is (Record.get)."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": ["a", "b"]}\n{"text": {"a": 1}}\n{"text": null}\n{"text": 42}\n{"text": "ok"}\n')
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "-q")
    assert result.code == 1, result
    assert read_jsonl(out) == [
        {"id": "1", "error": "line 1: field 'text' is not a string (a list)"},
        {"id": "2", "error": "line 2: field 'text' is not a string (an object)"},
        {"id": "3", "error": "line 3: field 'text' is null"},
        {"id": "4", "output": "24"},
        {"id": "5", "output": "KO"},
    ]


def test_a_predictor_of_many_batches_gets_each_window_at_once_with_the_same_output(run_cli, tmp_path):
    """A predictor with `predict_batches` (here 2 batches at a time on threads) gets every batch
    of a window in one call; the output is byte for byte that of batch-by-batch `predict`, in
    input order, and a record failing inside a batch is still pinned on that record alone."""
    texts = mixed_texts(100)
    texts[37] = "boom"
    texts[50] = "y" * 60  # fails check (too long), before batching
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    outputs = {}
    for workers in (0, 2):
        bundle = fake_predictor.make_bundle(tmp_path / f"bundle{workers}", "generate", workers=workers)
        outputs[workers] = tmp_path / f"out{workers}.jsonl"
        result = run_cli("generate", bundle, "-i", source, "-o", outputs[workers], "--batch-size", 4, "--window", 32)
        assert result.code == 1 and "2 record(s) failed" in result.err, result
    assert outputs[2].read_bytes() == outputs[0].read_bytes()
    rows = read_jsonl(outputs[2])
    assert [r["id"] for r in rows] == [str(i + 1) for i in range(100)]
    assert rows[37] == {"id": "38", "error": "line 38: the model failed on this text"}
    assert rows[36] == {"id": "37", "output": expected(texts[36])}
    assert rows[50]["error"].startswith("line 51: text of 60 tokens is longer")
    # Windows of 32, 32 (31 checked), 32 and 4 records: 8, 8, 8 and 1 batches of 4, each window's
    # in one call; "boom" sits in its window's first batch, so the 7 after it are handed over again.
    assert fake_predictor.FakePredictor.handovers == [8, 8, 7, 8, 1]


def test_a_record_failing_inside_predict_is_found_by_halving_the_batch(bundle):
    texts = [f"record {i}" for i in range(16)]
    texts[11] = "boom"
    ids = [list(t.encode()) for t in texts]
    results = batch.predict_isolating(fake_predictor.load(bundle), ids, {"max_new_tokens": 64})
    assert results[11] == {"error": "the model failed on this text"}
    assert [r["output"] for i, r in enumerate(results) if i != 11] == [expected(t) for t in texts if t != "boom"]
    calls = fake_predictor.FakePredictor.batches
    assert len(calls) == 1 + 2 * 4, calls  # the whole batch, then two halves at each of 4 levels


@pytest.mark.parametrize("policy,output", [("left", "Y" * 40), ("right", "Y" * 38 + "ZA")])
def test_truncate_policies(run_cli, bundle, tmp_path, policy, output):
    source = tmp_path / "in.txt"
    source.write_text("az" + "y" * 58 + "\n")  # 60 tokens, the model allows 40
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--truncate", policy)
    assert result.code == 0, result
    assert read_jsonl(out) == [{"id": "1", "output": output}]


def test_usage_errors_exit_2(run_cli, bundle, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("x\n")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "1", "output": "X"}\n')
    result = run_cli("generate", bundle, "-i", source, "-o", out)
    assert result.code == 2 and "--resume" in result.err and "--overwrite" in result.err
    assert run_cli("generate", bundle, "-i", source, "-o", out, "--overwrite").code == 0
    assert run_cli("generate", bundle, "-i", tmp_path / "nope.txt", "-o", tmp_path / "o2").code == 2
    result = run_cli("generate", bundle, "-i", source, "-o", tmp_path / "o3", "--device", "gpu7")
    assert result.code == 2 and "--device 'gpu7'" in result.err
    result = run_cli("generate", bundle, "-i", source, "-o", tmp_path / "o4", "--num-shards", 2, "--shard-index", 2)
    assert result.code == 2 and "--shard-index 2" in result.err


@pytest.mark.parametrize("task,options,message", [
    ("generate", ["--top-k", "5"], "--top-k and --top-p narrow sampling: give a --temperature > 0"),
    ("generate", ["--top-p", "0.9"], "--top-k and --top-p narrow sampling: give a --temperature > 0"),
    ("generate", ["--n-best", "2"], "--n-best 2 needs beam search (--num-beams 2 or more) or sampling "
                                    "(--temperature > 0)"),
    ("generate", ["--num-beams", "2", "--n-best", "3"], "--n-best 3 is more than --num-beams 2"),
    ("generate", ["--num-beams", "2", "--temperature", "0.7"],
     "beam search is deterministic: use --temperature 0 with --num-beams > 1"),
    ("translate", ["--n-best", "2", "--temperature", "1"], "--n-best 2 needs beam search (--num-beams 2 or more)"),
])
def test_decoding_options_that_cannot_go_together_stop_before_the_model_loads(run_cli, tmp_path, task, options,
                                                                             message):
    """They were refused by the predictor in its own names (`top_k`, `n_best must be between 1 and
    num_beams`, pre-empting translate's clearer message) once the model was loaded and the output
    opened, leaving a 0-byte output behind."""
    bundle = fake_predictor.make_bundle(tmp_path / "b", task)
    source = tmp_path / "in.txt"
    source.write_text("forty two\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(task, bundle, "-i", source, "-o", out, *options)
    assert result.code == 2, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kerasllm: error: {message}"), result
    assert not out.exists()
    assert fake_predictor.FakePredictor.devices == []  # no model loaded


@pytest.mark.parametrize("task,options", [("generate", ["--n-best", "2", "--temperature", "1"]),  # sampled n-best
                                          ("generate", ["--top-k", "5", "--temperature", "0.8"]),
                                          ("generate", ["--top-p", "1"]),  # no narrowing: greedy is fine
                                          ("translate", ["--n-best", "2", "--num-beams", "2"])])
def test_decoding_options_that_go_together_run(run_cli, tmp_path, task, options):
    bundle = fake_predictor.make_bundle(tmp_path / "b", task)
    source = tmp_path / "in.txt"
    source.write_text("forty two\n")
    result = run_cli(task, bundle, "-i", source, "-o", tmp_path / "out.jsonl", *options)
    assert result.code == 0, result


def test_resume_and_overwrite_together_are_a_usage_error_before_the_model_loads(run_cli, bundle, tmp_path):
    """--overwrite was silently ignored and the run resumed."""
    source = tmp_path / "in.txt"
    source.write_text("x\ny\n")
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "1", "output": "X"}\n')
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--resume", "--overwrite")
    assert result.code == 2, result
    assert result.err.splitlines() == ["kerasllm: error: --resume and --overwrite cannot go together (--resume "
                                       "continues --output, --overwrite replaces it): give one"]
    assert out.read_text() == '{"id": "1", "output": "X"}\n'  # untouched
    assert fake_predictor.FakePredictor.devices == []  # refused before the model loaded


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_an_output_that_is_a_directory_is_a_usage_error_before_the_model_loads(run_cli, bundle, tmp_path, resume):
    """It was `[Errno 21] Is a directory` (exit 1), once the model had loaded."""
    source = tmp_path / "in.txt"
    source.write_text("x\n")
    odir = tmp_path / "odir"
    odir.mkdir()
    result = run_cli("generate", bundle, "-i", source, "-o", odir, *resume)
    assert result.code == 2, result
    assert result.err.splitlines() == [f"kerasllm: error: {odir}: is a directory, expected a file "
                                       "(--output names the JSONL file to write)"]
    assert fake_predictor.FakePredictor.devices == []  # refused before the model loaded
    assert list(odir.iterdir()) == []


def test_a_job_failing_before_its_first_line_leaves_no_empty_output(run_cli, bundle, tmp_path, monkeypatch):
    from kerasllm.errors import UsageError

    def refuse(self, batch, **options):
        raise UsageError("the predictor refuses these options")

    monkeypatch.setattr(fake_predictor.FakePredictor, "predict", refuse)
    source = tmp_path / "in.txt"
    source.write_text("abc\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "-q")
    assert result.code == 2 and "the predictor refuses these options" in result.err, result
    assert not out.exists()


# -- pipes and devices as --input -----------------------------------------------------------------
def _feeding(fifo: Path, data: bytes):
    """A thread writing `data` into the named pipe `fifo` once a reader opens it; `stop()` unblocks
    a writer no reader came for (the job refused the pipe before reading it)."""
    import threading  # noqa: PLC0415

    def write() -> None:
        try:
            fifo.write_bytes(data)
        except OSError:  # stop()'s reader left before the data was written
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()

    def stop() -> None:
        deadline = time.time() + 10
        while writer.is_alive() and time.time() < deadline:  # a reader held open while the writer finishes
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            writer.join(timeout=0.05)
            os.close(reader)
        assert not writer.is_alive()

    return stop


@pytest.mark.parametrize("quiet", [[], ["-q"]], ids=["progress-bar", "quiet"])
def test_a_named_pipe_as_input_is_read_once_as_a_stream(run_cli, bundle, tmp_path, quiet):
    """A FIFO was refused as "no such file" (its check was `is_file()`); counting its lines for the
    progress bar would have consumed it before the job read it."""
    fifo = tmp_path / "in.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    stop = _feeding(fifo, b"abc\nde\n\nfgh\n")
    try:
        result = run_cli("generate", bundle, "-i", fifo, "-o", out, *quiet)
    finally:
        stop()
    assert result.code == 0, result
    assert read_jsonl(out) == [{"id": "1", "output": "CBA"}, {"id": "2", "output": "ED"},
                               {"id": "4", "output": "HGF"}]
    # --resume reads its input once too (the records the output holds are skipped as they stream by)
    out.write_text('{"id": "1", "output": "CBA"}\n')
    stop = _feeding(fifo, b"abc\nde\n\nfgh\n")
    try:
        result = run_cli("generate", bundle, "-i", fifo, "-o", out, "--resume", *quiet)
    finally:
        stop()
    assert result.code == 0, result
    assert read_jsonl(out) == [{"id": "1", "output": "CBA"}, {"id": "2", "output": "ED"},
                               {"id": "4", "output": "HGF"}]


def test_a_process_substitution_as_input_is_read(bundle, tmp_path):
    """`-i <(head -3 prompts.txt)` was `/dev/fd/63: no such file`."""
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(["bash", "-c", '"$0" "$1" generate "$2" -i <(printf "abc\\nde\\n") -o "$3"',
                           sys.executable, str(FAKE), str(bundle), str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(out) == [{"id": "1", "output": "CBA"}, {"id": "2", "output": "ED"}]


def test_a_pipe_cannot_be_sharded_and_a_directory_or_missing_input_is_named(run_cli, bundle, tmp_path):
    fifo = tmp_path / "in.txt"
    os.mkfifo(fifo)
    stop = _feeding(fifo, b"abc\n")
    try:
        result = run_cli("generate", bundle, "-i", fifo, "-o", tmp_path / "o.jsonl", "--num-shards", 2)
    finally:
        stop()
    assert result.code == 2, result
    assert result.err.splitlines() == [f"kerasllm: error: --num-shards needs a regular input file ({fifo} is a pipe "
                                       "or device: read once as a stream, it cannot be split into blocks)"]
    result = run_cli("generate", bundle, "-i", tmp_path, "-o", tmp_path / "o.jsonl")
    assert result.code == 2, result
    assert result.err.splitlines() == [f"kerasllm: error: {tmp_path}: is a directory, expected a file"]
    result = run_cli("generate", bundle, "-i", tmp_path / "nope.txt", "-o", tmp_path / "o.jsonl")
    assert result.code == 2, result
    assert result.err.splitlines() == [f"kerasllm: error: {tmp_path / 'nope.txt'}: no such file"]
    # a name holding a newline (or another control character) is named on one line all the same
    result = run_cli("generate", bundle, "-i", tmp_path / "a\nb\r\x1b\u2028\x85.txt", "-o", tmp_path / "o.jsonl")
    assert result.code == 2, result
    assert result.err.splitlines() == [f"kerasllm: error: {tmp_path}/a\\nb\\r\\x1b\\u2028\\x85.txt: no such file"]
    assert fake_predictor.FakePredictor.devices == []  # each refused before the model loaded
    assert not (tmp_path / "o.jsonl").exists()


# -- resume, signals ---------------------------------------------------------------------------
def _cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(FAKE), *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {count} lines")


@pytest.fixture(params=[0, 2], ids=["batch-by-batch", "2-batches-at-a-time"])
def slow_job(tmp_path, request):
    """A 400-record input, a fake bundle taking 20 ms a batch (predicting batch by batch, or
    `predict_batches` 2 at a time on threads), and its uninterrupted output."""
    bundle = fake_predictor.make_bundle(tmp_path / "slow", "generate", delay=0.02, workers=request.param)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(mixed_texts(400)) + "\n")
    full = tmp_path / "full.jsonl"
    args = ["generate", bundle, "-i", source, "--batch-size", 4, "--window", 32, "-q"]
    proc = _cli(*args, "-o", full)
    assert proc.wait(timeout=120) == 0, proc.communicate()
    return args, full


def test_resume_after_kill_equals_the_uninterrupted_output(slow_job, tmp_path):
    args, full = slow_job
    out = tmp_path / "out.jsonl"
    proc = _cli(*args, "-o", out)
    _wait_for_lines(out, 60, proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait(timeout=30)
    done = out.read_bytes().count(b"\n")
    assert 60 <= done < 400
    with open(out, "ab") as stream:  # as if the kill had cut a line in half
        stream.write(b'{"id": "99", "outp')
    proc = _cli(*args, "-o", out, "--resume")
    assert proc.wait(timeout=120) == 0, proc.communicate()
    assert out.read_bytes() == full.read_bytes()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_complete_lines_exits_nonzero_and_resume_finishes(slow_job, tmp_path, signum):
    args, full = slow_job
    out = tmp_path / "out.jsonl"
    proc = _cli(*[a for a in args if a != "-q"], "-o", out)
    _wait_for_lines(out, 40, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "rerun the same command with --resume" in err and "Traceback" not in err
    partial = out.read_bytes()
    assert partial.endswith(b"\n") and full.read_bytes().startswith(partial)
    assert len(partial) < len(full.read_bytes())
    proc = _cli(*args, "-o", out, "--resume")
    assert proc.wait(timeout=120) == 0, proc.communicate()
    assert out.read_bytes() == full.read_bytes()


class _Dropping:
    """Sends this process `signum` from its `__del__`, where Python runs the handler and drops what
    it raises ("Exception ignored in ..."), as it does in a weakref callback or garbage collection."""

    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        for _ in range(1000):  # the handler runs at the next bytecode boundary: in here
            pass


class _SignallingPredictor:
    """A predictor whose `signal_at`-th batch signals the process (in a `__del__`, or plainly)."""

    task = "generate"

    def __init__(self, signal_at: int, signum=signal.SIGINT, in_del: bool = True):
        self.calls, self.signal_at, self.signum, self.in_del = 0, signal_at, signum, in_del

    def check(self, text, truncate="error"):
        return list(text.encode())

    def predict(self, batch, **options):
        self.calls += 1
        if self.calls == self.signal_at:
            if self.in_del:
                _Dropping(self.signum)  # freed at once
            else:
                os.kill(os.getpid(), self.signum)
        return [{"output": "x"} for _ in batch]


def _run_records(predictor, tmp_path, count=40):
    from kerasllm.export.records import Record

    records = [Record(id=str(i), line=i, fields={"text": f"t{i}"}) for i in range(1, count + 1)]
    out = tmp_path / "out.jsonl"
    writer = batch.JsonlWriter(out)
    try:
        summary = batch.BatchRunner(predictor, batch_size=4, window=8).run(iter(records), writer)
    finally:
        writer.close()
    return summary, out.read_text().splitlines()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_whose_interrupt_python_drops_still_stops_the_job(tmp_path, monkeypatch, signum):
    """The guard's handler raised only: raised in a `__del__` (or a weakref callback), the
    Interrupted was dropped and the job ran to the end."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_value))
    previous = signal.getsignal(signum)
    try:
        summary, lines = _run_records(_SignallingPredictor(signal_at=3, signum=signum), tmp_path)
    finally:
        signal.signal(signum, previous)
    assert [type(err) for err in dropped] == [batch.Interrupted]  # Python dropped the handler's raise
    assert summary.interrupted is not None and summary.interrupted.signum == signum
    assert len(lines) == 12  # the three batches done, then stopped


def test_a_signal_ignored_when_the_job_starts_stays_ignored(tmp_path):
    """SIG_IGN inherited (`cmd &` in a script): the guard had installed its handler anyway, so a
    Ctrl-C meant for the script's foreground process stopped its background jobs too."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        summary, lines = _run_records(_SignallingPredictor(signal_at=2, in_del=False), tmp_path)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert summary.interrupted is None and len(lines) == 40


def test_a_signal_as_the_job_closes_is_no_exception_ignored_in_the_progress_bar(run_cli, bundle, tmp_path,
                                                                                 monkeypatch):
    """A SIGINT just after the last record: the default handler's KeyboardInterrupt landed in
    tqdm.__del__, which printed "Exception ignored in: <function tqdm.__del__ ...>" and a traceback."""
    import tqdm

    sent = []
    original = tqdm.tqdm.__del__

    def signalling_del(self):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        original(self)

    monkeypatch.setattr(tqdm.tqdm, "__del__", signalling_del)
    source = tmp_path / "in.txt"
    source.write_text("abc\nde\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "-q")
    assert sent and result.code == 130, result
    assert "Exception ignored" not in result.err and "Traceback" not in result.err
    assert len(out.read_text().splitlines()) == 2  # everything was written


def test_resume_refuses_an_output_of_another_input(run_cli, bundle, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"k": "a", "text": "x"}\n{"k": "b", "text": "y"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "zz", "output": "X"}\n')
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--id-field", "k", "--resume")
    assert result.code == 2 and "line 1 has id 'zz' but input record 1 (line 1) has id 'a'" in result.err
    assert out.read_text() == '{"id": "zz", "output": "X"}\n'  # nothing lost


def test_resume_of_a_finished_output_is_a_no_op_that_still_reports_failures(run_cli, bundle, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a\nboom\n")
    out = tmp_path / "out.jsonl"
    assert run_cli("generate", bundle, "-i", source, "-o", out).code == 1
    before = out.read_bytes()
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--resume")
    assert result.code == 1 and "1 record(s) failed" in result.err and "+2 already in the output" in result.err
    assert out.read_bytes() == before


# -- shards ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_sharded_runs_joined_equal_the_unsharded_run(run_cli, bundle, tmp_path, suffix):
    texts = mixed_texts(101)
    source = tmp_path / f"in{suffix}"
    if suffix == ".csv":
        source.write_text("text\n" + "\n".join(texts[:50]) + "\n\n" + "\n".join(texts[50:]) + "\n")
    else:
        source.write_text("\n".join(texts) + "\n")
    whole = tmp_path / "whole.jsonl"
    assert run_cli("generate", bundle, "-i", source, "-o", whole).code == 0
    parts = []
    for index in range(3):
        part = tmp_path / f"part{index}.jsonl"
        result = run_cli("generate", bundle, "-i", source, "-o", part, "--num-shards", 3, "--shard-index", index)
        assert result.code == 0, result
        parts.append(part.read_bytes())
    assert all(parts) and b"".join(parts) == whole.read_bytes()
    assert len(whole.read_bytes().splitlines()) == 101


def test_a_shard_without_records_succeeds_with_an_empty_part(run_cli, bundle, tmp_path):
    """A shard holding no records (more shards than lines, or a block of blank lines) failed its
    array task: "no records to process", exit 1, and no part to concatenate."""
    source = tmp_path / "in.txt"
    source.write_text("abc\nde\nfgh\n")
    whole = tmp_path / "whole.jsonl"
    assert run_cli("generate", bundle, "-i", source, "-o", whole, "-q").code == 0
    parts = []
    for index in range(5):  # blocks of the 3 lines: shards 0 and 2 get none
        part = tmp_path / f"part{index}.jsonl"
        loads = len(fake_predictor.FakePredictor.devices)
        result = run_cli("generate", bundle, "-i", source, "-o", part, "--num-shards", 5, "--shard-index", index)
        assert result.code == 0, result
        parts.append(part.read_bytes())
        if index in (0, 2):
            assert result.err.splitlines() == [f"kerasllm: generate: --shard-index {index} of 5: no records in this "
                                               f"shard's block ({source} has 3 lines, fewer than the shards); "
                                               f"wrote an empty {part}"]
            assert len(fake_predictor.FakePredictor.devices) == loads  # no model loaded for nothing
    assert [bool(p) for p in parts] == [False, True, False, True, True]
    assert b"".join(parts) == whole.read_bytes()
    # quiet: no note; a rerun with --resume of the empty part is done too
    result = run_cli("generate", bundle, "-i", source, "-o", tmp_path / "part0.jsonl", "--num-shards", 5,
                     "--shard-index", 0, "--resume", "-q")
    assert (result.code, result.err, (tmp_path / "part0.jsonl").read_bytes()) == (0, "", b"")
    # a block of blank lines
    source.write_text("a\n\n\n\nb\n")
    result = run_cli("generate", bundle, "-i", source, "-o", tmp_path / "blank.jsonl", "--num-shards", 3,
                     "--shard-index", 1)
    assert result.code == 0, result
    assert result.err.splitlines() == [f"kerasllm: generate: --shard-index 1 of 3: no records in this shard's block "
                                       f"(lines 2-3 of {source} hold none); wrote an empty {tmp_path / 'blank.jsonl'}"]
    assert (tmp_path / "blank.jsonl").read_bytes() == b""


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_a_sharded_run_of_an_empty_input_is_still_an_error(run_cli, bundle, tmp_path, content):
    source = tmp_path / "empty.txt"
    source.write_bytes(content)
    for index in range(2):
        out = tmp_path / f"part{index}.jsonl"
        result = run_cli("generate", bundle, "-i", source, "-o", out, "--num-shards", 2, "--shard-index", index, "-q")
        assert result.code == 1, result
        assert result.err.splitlines() == [f"kerasllm: error: {source}: no records to process (the input is empty "
                                           "or holds only blank lines)"]
        assert not out.exists()


# -- reader fuzzing ----------------------------------------------------------------------------
GOOD = [f"good record {i}" for i in range(5)]


# random bytes, and lines built from the bytes that readers trip on (quotes, CR, tabs, brackets, bad UTF-8)
TRICKY = st.lists(st.sampled_from([b"\r", b'"', b",", b"\t", b"{", b"}", b"[", b":", b"\\", b"\xff", b"\xc3",
                                   b"\xe2\x82", b"\x00", b" ", b"a", b"\n", b'"text"']), max_size=20).map(b"".join)
JUNK = st.lists(st.binary(max_size=40) | TRICKY, min_size=1, max_size=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=JUNK, fmt=st.sampled_from(["text", "jsonl", "csv", "tsv"]))
def test_fuzzed_input_never_crashes_the_job_or_loses_a_good_record(tmp_path_factory, junk, fmt):
    """Random byte lines between good records: every good record comes out right, by line."""
    if fmt in ("csv", "tsv"):
        # Each junk line a whole row: quotes doubled, so none is left open (an open quote starts a
        # quoted field that rightly runs on over the next lines, good records' included).
        junk = [line.replace(b'"', b'""') for line in junk]
    path = tmp_path_factory.mktemp("fuzz") / f"in.{fmt}"
    header = b"text\n" if fmt in ("csv", "tsv") else b""
    encode = {"text": lambda t: t.encode(), "csv": lambda t: t.encode(), "tsv": lambda t: t.encode(),
              "jsonl": lambda t: json.dumps({"text": t}).encode()}[fmt]
    content, good_lines = bytearray(header), {}
    for i, text in enumerate(GOOD):
        content += junk[i % len(junk)] + b"\n"
        good_lines[content.count(b"\n") + 1] = text
        content += encode(text) + b"\n"
    path.write_bytes(bytes(content))
    out = path.with_suffix(".out")
    bundle = fake_predictor.make_bundle(path.parent / "bundle", "generate", max_len=1000)
    writer = batch.JsonlWriter(out)
    # A first line that says the file is not UTF-8 text lines (compressed, UTF-16, carriage-return line
    # ends, a JSON array's "[") stops the job at that line, one DataError naming the file, nothing written.
    lines = [line + b"\n" for line in bytes(content).split(b"\n")]
    first, unmarked = lines[0], lines[0].removeprefix(records.BOM)
    written = [line.decode("utf-8", "replace").strip() for line in [unmarked, *lines[1:]]]
    whole_file = bool(first == unmarked and records.not_text(first) or records.cr_only_line_ends(unmarked)
                      or fmt == "jsonl" and next(text for text in written if text) == "[")
    try:
        summary = batch.BatchRunner(fake_predictor.load(bundle), {"max_new_tokens": 64}, batch_size=3,
                                    window=4).run(read_records(path, fmt), writer)
    except DataError as err:
        assert whole_file and str(err).startswith(f"{path}: "), err
        writer.close()
        assert out.read_bytes() == b""
        return
    writer.close()
    assert not whole_file
    rows = read_jsonl(out)
    assert summary.records == len(rows)
    by_id = {row["id"]: row for row in rows}
    for line, text in good_lines.items():
        assert by_id[str(line)] == {"id": str(line), "output": expected(text)}, (line, rows)
    assert [int(r["id"]) for r in rows] == sorted(int(r["id"]) for r in rows)  # input order


def test_reader_turns_pathological_lines_into_error_records(tmp_path):
    jsonl, csv_file = tmp_path / "deep.jsonl", tmp_path / "cr.csv"
    jsonl.write_bytes(b"[" * 100_000 + b'\n{"text": "ok"}\n')
    csv_file.write_bytes(b'text\na\rb\n"x\ry"\nok\n')
    assert [(r.line, r.error) for r in read_records(jsonl)] == [(1, "malformed JSON (nested too deeply)"), (2, None)]
    records = list(read_records(csv_file))
    assert [(r.line, r.error) for r in records] == [(2, "malformed row (a carriage return in an unquoted field)"),
                                                   (3, None), (4, None)]
    assert records[1].fields == {"text": "x\ry"}


def test_writer_turns_numpy_results_into_plain_json(tmp_path):
    import numpy as np

    writer = batch.JsonlWriter(tmp_path / "o.jsonl")
    writer.write([{"id": "1", "embedding": np.array([0.5, 0.25], np.float32), "scores": {"a": np.float32(0.75)}}])
    writer.close()
    assert read_jsonl(tmp_path / "o.jsonl") == [{"id": "1", "embedding": [0.5, 0.25], "scores": {"a": 0.75}}]


def test_count_lines_and_shard_blocks_cover_the_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a\nb\n\nc")  # last line without newline
    assert batch.count_lines(path) == 4
    blocks = [batch.shard_lines(10, 3, i) for i in range(3)]
    assert blocks == [(1, 3), (4, 6), (7, 10)]
    path.write_bytes(b"")
    assert batch.count_lines(path) == 0
    assert os.path.getsize(path) == 0


# -- the trained --seq-len warning ---------------------------------------------------------------
SEQ_LEN_WARNING = "longer than the --seq-len"


def test_going_past_the_trained_seq_len_warns_once_and_changes_nothing_else(run_cli, tmp_path):
    texts = mixed_texts(25)  # 3..38 tokens, so 5 windows of 5, every window past 20 + 10
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts + ["boom"]) + "\n", encoding="utf-8")
    plain = fake_predictor.make_bundle(tmp_path / "plain", "generate")  # an older bundle: no seq_len
    trained = fake_predictor.make_bundle(tmp_path / "trained", "generate", seq_len=20)
    runs = {}
    for name, source_dir, quiet in [("plain", plain, []), ("loud", trained, []), ("quiet", trained, ["-q"])]:
        out = tmp_path / f"{name}.jsonl"
        runs[name] = (run_cli("generate", source_dir, "-i", source, "-o", out, "--window", 5,
                              "--max-new-tokens", 10, *quiet), out.read_bytes())
    longest = max(len(t) for t in texts[:5]) + 10
    for name in ("loud", "quiet"):
        result, output = runs[name]
        assert result.code == runs["plain"][0].code == 1  # the "boom" record, as without the warning
        assert output == runs["plain"][1]
        warnings = [line for line in result.err.splitlines() if SEQ_LEN_WARNING in line]
        assert warnings == [f"kerasllm: warning: prompts + --max-new-tokens reach {longest} tokens, longer than "
                            "the --seq-len 20 the model was trained with; text past it degrades"], result.err
    assert SEQ_LEN_WARNING not in runs["plain"][0].err


def test_prompts_within_the_trained_seq_len_give_no_warning(run_cli, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("abc\nabcdefghij\n", encoding="utf-8")  # 10 + 10 = 20: within
    trained = fake_predictor.make_bundle(tmp_path / "trained", "generate", seq_len=20)
    result = run_cli("generate", trained, "-i", source, "-o", tmp_path / "o.jsonl", "--max-new-tokens", 10)
    assert result.code == 0 and SEQ_LEN_WARNING not in result.err, result.err
    # A later window going past it still gets its one line (the prompts stream in).
    source.write_text("abc\nabcdefghij\nabcdefghijk\nabcdefghijkl\n", encoding="utf-8")
    result = run_cli("generate", trained, "-i", source, "-o", tmp_path / "o.jsonl", "--overwrite",
                     "--window", 2, "--max-new-tokens", 10)
    assert result.code == 0
    assert [line for line in result.err.splitlines() if SEQ_LEN_WARNING in line] == [
        "kerasllm: warning: prompts + --max-new-tokens reach 22 tokens, longer than the --seq-len 20 the model "
        "was trained with; text past it degrades"]


def test_texts_past_the_trained_seq_len_warn_once_for_classify_and_embed(run_cli, tmp_path):
    """An encoder saw positions up to its training --seq-len only: `classify` and `embed` say once
    when a text goes past it (the outputs and exit code unchanged), and nothing for texts within."""
    texts = mixed_texts(25)  # 3..38 tokens
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    for task in ("classify", "embed"):
        plain = fake_predictor.make_bundle(tmp_path / f"{task}-plain", task)
        trained = fake_predictor.make_bundle(tmp_path / f"{task}-trained", task, seq_len=20)
        outputs = {}
        for name, bundle in (("plain", plain), ("trained", trained)):
            out = tmp_path / f"{task}-{name}.jsonl"
            result = run_cli(task, bundle, "-i", source, "-o", out, "--window", 5)
            assert result.code == 0, result
            outputs[name] = (out.read_bytes(), [line for line in result.err.splitlines() if SEQ_LEN_WARNING in line])
        assert outputs["plain"][0] == outputs["trained"][0] and outputs["plain"][1] == []
        longest = max(len(t) for t in texts[:5])
        assert outputs["trained"][1] == [f"kerasllm: warning: texts reach {longest} tokens, longer than the --seq-len 20 "
                                         "the model was trained with; results for such texts may degrade"]
        short = tmp_path / "short.txt"
        short.write_text("abc\nabcdefghij\n", encoding="utf-8")
        result = run_cli(task, trained, "-i", short, "-o", tmp_path / f"{task}-short.jsonl")
        assert result.code == 0 and SEQ_LEN_WARNING not in result.err, result.err


def test_the_seq_len_warning_is_capped_at_the_models_max_length():
    from kerasllm.cli.infer import context_check

    class Predictor:
        trained_seq_len = 64
        max_length = 64  # generation stops there: never past the trained positions

    messages = []
    check = context_check(Predictor(), 100, messages.append)
    check([63, 10])
    assert messages == []
    Predictor.max_length = 128
    check = context_check(Predictor(), 100, messages.append)
    check([3])
    check([50])
    assert len(messages) == 1 and "reach 103 tokens" in messages[0]
    assert context_check(object(), 100, messages.append) is None  # no recorded seq_len: no hook


def test_batch_jobs_let_the_heap_keep_freed_memory(run_cli, bundle, tmp_path, monkeypatch):
    """A batch job's process keeps what its heap frees for the next batch (runtime.retain_freed_memory:
    glibc's mallopt; elsewhere it reports that nothing changed), set once, before the model loads and
    any batch runs; the outputs are as without it."""
    import platform

    from kerasllm.export import runtime

    assert runtime.retain_freed_memory() is (platform.libc_ver()[0] == "glibc")
    calls = []
    monkeypatch.setattr(runtime, "retain_freed_memory", lambda: calls.append(len(fake_predictor.FakePredictor.batches)))
    source, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("abc\ndef\n")
    assert run_cli("generate", bundle, "-i", source, "-o", out, "-q").code == 0
    assert calls == [0]  # once, before any batch ran
    assert [json.loads(line)["output"] for line in out.read_text().splitlines()] == [expected("abc"), expected("def")]


@pytest.mark.parametrize("how", ["dropped", "import"])
def test_a_signal_while_the_model_loads_stops_the_job(run_cli, tmp_path, monkeypatch, how):
    """Before the job's guard, Python's own KeyboardInterrupt raised in a weakref callback of an
    import was dropped, and the job ran to its end (QA: once in ~330 interrupted runs under load);
    one raised inside a C extension's import comes out as an ImportError caused by it."""
    from kerasllm.export import predict

    def load(task, source, device=None):
        if how == "dropped":
            _Dropping(signal.SIGINT)  # the signal lands, and its raise is dropped, inside the load
        else:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):
                    pass
            except Exception as err:
                raise ImportError("initialization failed") from err
        return _SignallingPredictor(signal_at=0)

    monkeypatch.setattr(predict, "load_predictor", load)
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\n")
    result = run_cli("generate", tmp_path, "-i", source, "-o", tmp_path / "out.jsonl", "-q")
    assert result.code == 130, result
    assert result.err.strip().splitlines()[-1] == ("kerasllm: interrupted by SIGINT while loading the model; "
                                                   "nothing was written")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["generate", "translate", "classify", "embed", "tag"])
def test_every_batch_option_says_what_it_does_in_help(run_cli, command):
    """--repetition-penalty (generate, translate) had shown only its default and range."""
    import click

    from kerasllm.cli import infer

    options = [p for p in getattr(infer, command).params if isinstance(p, click.Option)]
    assert [p.name for p in options if not p.help] == []
    if command in ("generate", "translate"):
        result = run_cli(command, "--help")
        assert result.code == 0
        text = " ".join(result.out.split())
        assert "--repetition-penalty FLOAT RANGE Discourage repeats:" in text
        assert "1 is off" in text and "[default: 1.0; x>0]" in text


# -- closed standard streams, the locale, jobs racing for an output ----------------------------------
def _closed(redirect: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """The CLI (fake predictors) with a standard stream closed by `redirect`: `<&-`, `>&-` or `2>&-`."""
    return subprocess.run(["bash", "-c", f'"$@" {redirect}', "bash", sys.executable, str(FAKE), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, **kwargs)


def test_a_closed_standard_input_does_not_matter_with_an_input_file(bundle, tmp_path):
    """`<&-` with `-i FILE`: the job had failed at the end of its input (records.py compared with
    `sys.stdin.buffer`, and sys.stdin is None), its last window lost, and --resume failed the same way."""
    source = tmp_path / "in.txt"
    source.write_text("".join(f"t{i}\n" for i in range(5)))
    out = tmp_path / "out.jsonl"
    proc = _closed("<&-", "generate", bundle, "-i", source, "-o", out, "--window", 2, "-q")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert read_jsonl(out) == [{"id": str(i + 1), "output": expected(f"t{i}")} for i in range(5)]
    # `-i -` (the default) with nothing to read: one line, exit 2, before the model loads (it would fail)
    (bundle / "manifest.json").write_text('{"task": "generate"}')
    proc = _closed("<&-", "generate", bundle, "-o", tmp_path / "o.jsonl", "-q")
    assert (proc.returncode, proc.stderr.splitlines()) == (2, ["kerasllm: error: standard input is closed: "
                                                               "pass --input FILE"])
    assert not (tmp_path / "o.jsonl").exists()


def test_a_closed_standard_output_is_one_line_before_the_model_loads(bundle, tmp_path):
    """`>&-` with `-o -` (the default) had been an AttributeError traceback at the first write."""
    source = tmp_path / "in.txt"
    source.write_text("abc\n")
    (bundle / "manifest.json").write_text('{"task": "generate"}')  # a model that would fail to load
    proc = _closed(">&-", "generate", bundle, "-i", source, "-q")
    assert (proc.returncode, proc.stderr.splitlines()) == (2, ["kerasllm: error: standard output is closed: "
                                                               "pass --output FILE"])


@pytest.mark.parametrize("bad", [False, True], ids=["all-good", "an-error-record"])
def test_a_closed_standard_error_stops_no_job(bundle, tmp_path, monkeypatch, bad):
    """`2>&-` without --quiet: the progress bar had been handed None (sys.stderr) and failed at its
    first write, exit 1 with no output; warnings about failed records go nowhere, not to stdout."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "abc"}\n{"text": "de"}\n' + ('{"nope": 1}\n' if bad else ""))
    out = tmp_path / "out.jsonl"
    proc = _closed("2>&-", "generate", bundle, "-i", source, "-o", out)
    assert (proc.returncode, proc.stdout) == (1 if bad else 0, "")
    rows = read_jsonl(out)
    assert rows[:2] == [{"id": "1", "output": "CBA"}, {"id": "2", "output": "ED"}]
    assert len(rows) == 2 + bad and (not bad or rows[2]["error"].startswith("line 3: missing field 'text'"))
    # The batch command itself, without `kerasllm.cli.main` (which puts /dev/null in a closed stderr's place)
    from kerasllm.cli.infer import generate

    out.unlink()
    monkeypatch.setattr("sys.stderr", None)
    try:
        generate.main([str(bundle), "-i", str(source), "-o", str(out)], standalone_mode=False)
        code = 0
    except SystemExit as stop:
        code = stop.code
    assert (code, read_jsonl(out)) == (1 if bad else 0, rows)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_jsonl_on_standard_output_is_utf8_whatever_the_locale(bundle, tmp_path, encoding):
    """Standard output's text layer follows the locale: PYTHONIOENCODING=ascii had raised a
    UnicodeEncodeError traceback at the first non-ASCII record, latin-1 had written JSONL that
    no UTF-8 reader reads."""
    source = tmp_path / "in.txt"
    texts = ["Zoë", "ok", "Zürich ☃"]
    source.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(FAKE), "generate", str(bundle), "-i", str(source), "-q"],
                          capture_output=True, cwd=REPO, timeout=60, env={**os.environ, "PYTHONIOENCODING": encoding})
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()] == [
        {"id": str(i + 1), "output": expected(t)} for i, t in enumerate(texts)]


def test_an_output_another_job_creates_while_the_model_loads_is_refused(run_cli, bundle, tmp_path, monkeypatch):
    """Two jobs started together with the same --output both passed the check that it did not exist
    and both opened it with "w": the file held lines of both, and both exited 0. The writer creates it
    exclusively: the job that comes second is refused as one started after the first, the first's
    file left as it is."""
    source = tmp_path / "in.txt"
    source.write_text("abc\nde\n")
    out = tmp_path / "out.jsonl"
    theirs = '{"id": "B1", "output": "the other job\'s"}\n'
    load = fake_predictor.load

    def raced(source, **kwargs):  # the other job opens the output while this one loads its model
        out.write_text(theirs)
        return load(source, **kwargs)

    monkeypatch.setattr(fake_predictor, "load", raced)
    result = run_cli("generate", bundle, "-i", source, "-o", out, "-q")
    assert (result.code, result.err.splitlines()) == (2, [f"kerasllm: error: {out} exists: add --resume to "
                                                          "continue it or --overwrite to replace it"])
    assert out.read_text() == theirs
    # An empty file too (what the other job has before its first window), refused before the model loads.
    out.write_bytes(b"")
    monkeypatch.setattr(fake_predictor, "load", load)
    fake_predictor.FakePredictor.devices.clear()
    result = run_cli("generate", bundle, "-i", source, "-o", out, "-q")
    assert (result.code, fake_predictor.FakePredictor.devices, out.read_bytes()) == (2, [], b""), result
    assert run_cli("generate", bundle, "-i", source, "-o", out, "-q", "--overwrite").code == 0
    assert read_jsonl(out) == [{"id": "1", "output": "CBA"}, {"id": "2", "output": "ED"}]
    # What is not a regular file is written as it is; a symbolic link to a new file creates it.
    assert run_cli("generate", bundle, "-i", source, "-o", os.devnull, "-q").code == 0
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "target.jsonl")
    assert run_cli("generate", bundle, "-i", source, "-o", link, "-q").code == 0
    assert read_jsonl(tmp_path / "target.jsonl") == read_jsonl(out)


def test_an_output_naming_an_open_descriptor_is_written_as_the_stream_it_is(run_cli, bundle, tmp_path):
    """`-o /dev/stdout`, `/dev/fd/N` (bash's `>(gzip > out.gz)`) and `/proc/self/fd/N`: the exclusive
    creation had resolved such a link to "/proc/PID/fd/pipe:[N]" and failed after the model load, and
    refused one the shell had opened on an empty file (`-o /dev/stdout > out.jsonl`) as existing."""
    source = tmp_path / "in.txt"
    source.write_text("abc\nde\n")
    expected = [{"id": "1", "output": "CBA"}, {"id": "2", "output": "ED"}]
    read, write = os.pipe()
    try:
        assert run_cli("generate", bundle, "-i", source, "-o", f"/dev/fd/{write}", "-q").code == 0
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            assert [json.loads(line) for line in pipe.read().splitlines()] == expected
    finally:
        for fd in (read, write):
            with contextlib.suppress(OSError):
                os.close(fd)
    shell_opened = tmp_path / "out.jsonl"
    with open(shell_opened, "wb") as stream:  # empty, as `> out.jsonl` leaves it
        assert run_cli("generate", bundle, "-i", source, "-o", f"/proc/self/fd/{stream.fileno()}", "-q").code == 0
    assert read_jsonl(shell_opened) == expected

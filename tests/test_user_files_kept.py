"""Files a user already has are never lost to a command's output: `--resume` leaves a file it did
not write as it is (the batch CLI on the fake predictor), `evaluate --output` never replaces its data."""

from __future__ import annotations

import pytest

import fake_predictor
from kerasllm.export.predict import PREDICTORS


@pytest.fixture(autouse=True)
def fake_predictors(monkeypatch):
    for task in fake_predictor.TASKS:
        monkeypatch.setitem(PREDICTORS, (task, "bundle"), "fake_predictor:load")


@pytest.mark.parametrize("content", [
    b"line one of my notes\nmy second line, no newline at end",  # the last line had been cut, then refused
    b'{"important": true, "config": [1, 2, 3]}',  # one unterminated line: had been emptied, then overwritten
    b'{"id": "1", "output": "a"}\nnot a record\n',
])
def test_resume_refuses_a_file_it_did_not_write_and_changes_nothing(run_cli, tmp_path, content):
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "generate")
    source = tmp_path / "in.txt"
    source.write_text("a\nb\nc\n")
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--resume")
    assert result.code == 1 and "not a kerasllm output record" in result.err, result
    assert out.read_bytes() == content


@pytest.mark.parametrize("torn", [b'{"id": "2", "outp', b'{"i', b"{"])
def test_resume_cuts_a_record_torn_by_a_kill_and_finishes(run_cli, tmp_path, torn):
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "generate")
    source = tmp_path / "in.txt"
    source.write_text("a\nb\nc\n")
    full = tmp_path / "full.jsonl"
    assert run_cli("generate", bundle, "-i", source, "-o", full).code == 0
    first = full.read_bytes().split(b"\n")[0] + b"\n"
    out = tmp_path / "out.jsonl"
    out.write_bytes(first + torn)
    assert run_cli("generate", bundle, "-i", source, "-o", out, "--resume").code == 0
    assert out.read_bytes() == full.read_bytes()


def test_evaluate_refuses_to_write_its_metrics_over_its_data(run_cli, tmp_path):
    """It had replaced the data file with the metrics' JSON, exit 0. Refused before the model loads
    (SOURCE here is no model at all)."""
    source = tmp_path / "no-model"
    source.mkdir()
    data = tmp_path / "test.tsv"
    data.write_text("text\tlabel\ngood\tpositive\n")
    before = data.read_bytes()
    result = run_cli("evaluate", source, "--data", data, "--output", tmp_path / "." / "test.tsv")
    assert result.code == 2 and "is also the --data file" in result.err, result
    assert data.read_bytes() == before

"""A stopped batch job's settings, kept beside its output, refuse a --resume that would mix two jobs."""

from __future__ import annotations

import json

import pytest

import fake_predictor
from kerasllm.export.predict import PREDICTORS


@pytest.fixture(autouse=True)
def fake_predictors(monkeypatch):
    for task in fake_predictor.TASKS:
        monkeypatch.setitem(PREDICTORS, (task, "bundle"), "fake_predictor:load")


@pytest.fixture
def stopped_job(run_cli, tmp_path, monkeypatch):
    """A generate job (--max-new-tokens 8) that failed in its third window of 2 records: its first
    4 records written, its record kept beside the output."""
    bundle = fake_predictor.make_bundle(tmp_path / "bundle", "generate")
    source = tmp_path / "in.txt"
    source.write_text("".join(f"text {i}\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    original = fake_predictor.FakePredictor.predict

    def crash_on_the_third_window(self, batch, **options):
        if any(b"text 4" == bytes(row) for row in batch):
            raise RuntimeError("the machine broke")
        return original(self, batch, **options)

    monkeypatch.setattr(fake_predictor.FakePredictor, "predict", crash_on_the_third_window)
    with pytest.raises(RuntimeError, match="the machine broke"):
        run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--window", "2")
    monkeypatch.setattr(fake_predictor.FakePredictor, "predict", original)
    assert len(out.read_text().splitlines()) == 4 and (tmp_path / ".out.jsonl.job.json").is_file()
    return bundle, source, out


def test_a_resume_with_other_options_is_refused_and_the_output_kept(run_cli, stopped_job, tmp_path):
    """It had appended 4-token outputs to the 8-token ones, exit 0."""
    bundle, source, out = stopped_job
    before = out.read_bytes()
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "4", "--resume")
    assert (result.code, result.err.splitlines()) == (2, [
        f"kerasllm: error: --resume: {out} was started with other options (max_new_tokens 8, now 4); rerun with the "
        "job's options, or pass --overwrite to start again"]), result
    assert out.read_bytes() == before


def test_a_resume_from_a_changed_model_is_refused(run_cli, stopped_job, tmp_path):
    bundle, source, out = stopped_job
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["fake"]["max_len"] = 41
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--resume")
    assert result.code == 2 and "was started from" in result.err and "manifest.json has changed since" in result.err


def test_a_resume_from_a_byte_identical_copy_of_the_bundle_goes_on(run_cli, stopped_job, tmp_path):
    """A fresh download (or `cp`) of the same bundle had been "its manifest.json has changed since" (its
    modification time), --overwrite the only way on: the records written were lost."""
    import os
    import shutil

    bundle, source, out = stopped_job
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)  # new modification times
    shutil.rmtree(bundle)
    copy.rename(bundle)
    os.utime(bundle / "manifest.json", ns=(1, 1))
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--resume")
    assert result.code == 0, result
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [str(i) for i in range(1, 11)]


def test_a_resume_with_the_jobs_options_finishes_and_removes_the_record(run_cli, stopped_job, tmp_path):
    """Speed settings may change (a job stopped for memory resumes with smaller batches)."""
    bundle, source, out = stopped_job
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--resume",
                     "--batch-size", "1", "--window", "3")
    assert result.code == 0, result
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [str(i) for i in range(1, 11)]
    assert not (tmp_path / ".out.jsonl.job.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "in.txt", "out.jsonl"]

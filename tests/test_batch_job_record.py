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


def _edit_record(tmp_path, edit) -> None:
    path = tmp_path / ".out.jsonl.job.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def test_a_record_of_the_earlier_source_identity_resumes_while_the_manifest_is_as_it_was(run_cli, stopped_job,
                                                                                         tmp_path):
    """Records of 2026-12-07 identified a bundle's manifest by size and modification time (its SHA-256 since):
    their jobs had been refused after an upgrade ("manifest.json has changed since"), --overwrite the only way."""
    import os

    bundle, source, out = stopped_job
    stat = (bundle / "manifest.json").stat()

    def earlier_identity(record):
        del record["source"]["sha256"]
        record["source"].update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)

    _edit_record(tmp_path, earlier_identity)
    command = ("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--resume")
    os.utime(bundle / "manifest.json", ns=(1, 1))  # touched since: refused, as before
    refused = run_cli(*command)
    assert refused.code == 2 and "manifest.json has changed since" in refused.err, refused
    os.utime(bundle / "manifest.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_cli(*command)
    assert result.code == 0, result
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [str(i) for i in range(1, 11)]


def test_a_record_with_settings_of_another_version_is_named_so(run_cli, stopped_job, tmp_path):
    """A record holding a setting this version does not record (what the next version adding an option writes)
    had been "started with other options ()": blamed on options the user had not changed."""
    bundle, source, out = stopped_job
    before = out.read_bytes()
    _edit_record(tmp_path, lambda r: r["options"].update(min_new_tokens=None))
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--resume")
    assert (result.code, result.err.splitlines()) == (2, [
        f"kerasllm: error: --resume: {out} was started by another kerasllm version (its job record and this one's "
        "differ in min_new_tokens); finish it with that version, or pass --overwrite to start again"]), result
    assert out.read_bytes() == before


def test_a_resume_of_an_output_without_a_record_says_it_cannot_be_checked(run_cli, stopped_job, tmp_path):
    """An output of a job started before job records existed had been resumed with another model and other
    options, silently, exit 0: it still resumes (nothing to refuse it by), with a warning, under -q too."""
    bundle, source, out = stopped_job
    (tmp_path / ".out.jsonl.job.json").unlink()
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--resume", "-q")
    assert result.code == 0, result
    assert result.err.splitlines() == [f"kerasllm: warning: {out} has records but no job record (a job started by an "
                                       "older kerasllm, or whose record could not be kept): its model and options "
                                       "cannot be checked against this resume's"]
    again = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--resume", "-q")
    assert (again.code, again.err) == (0, "")  # a finished job's output (its record gone): nothing appended, no word
    assert len(out.read_text().splitlines()) == 10


def test_a_resume_by_another_command_is_named_so(run_cli, stopped_job, tmp_path):
    """`classify --resume` of a stopped `generate` job had read "started by another kerasllm version"."""
    bundle, source, out = stopped_job
    _edit_record(tmp_path, lambda record: record.update(task="classify"))
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--max-new-tokens", "8", "--resume")
    assert (result.code, result.err.splitlines()) == (2, [
        f"kerasllm: error: --resume: {out} was started by `kerasllm classify`, not `kerasllm generate`; resume it "
        "with that command, or pass --overwrite to start again"]), result

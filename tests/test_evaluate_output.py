"""`kerasllm evaluate --output`: a path that cannot be written is refused before the evaluation
runs, and a write that still fails loses none of the metrics (they are on standard output first).
The evaluation itself is a stand-in here (its metrics are tested with each family)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

METRICS = {"count": 2, "accuracy": 0.5}


@pytest.fixture
def evaluations(tmp_path, monkeypatch):
    """The paths of the evaluations run (a stand-in evaluation returning METRICS); a model dir and a data file."""
    from kerasllm import evaluation

    ran = []

    def evaluate(source, data, **options):
        ran.append(Path(source))
        hook = getattr(evaluate, "during", None)
        if hook:
            hook()
        return dict(METRICS)

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    (tmp_path / "model").mkdir()
    (tmp_path / "test.tsv").write_text("text\tlabel\ngood\tpositive\n")
    return ran, evaluate


def test_metrics_go_to_standard_output_and_the_output_file(run_cli, tmp_path, evaluations):
    out = tmp_path / "new" / "dir" / "metrics.json"
    result = run_cli("evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output", out)
    assert (result.code, json.loads(result.out), json.loads(out.read_text())) == (0, METRICS, METRICS), result
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]  # no partial file left


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_output_that_cannot_be_written_is_refused_before_the_evaluation(run_cli, tmp_path, evaluations, where):
    """The metrics had been computed, then lost: "[Errno 17] File exists: 'afile'" or a message naming
    the partial file ('/proc/.metrics.json.partial'), nothing on standard output, exit 1."""
    ran, _ = evaluations
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        out, reason = Path("/proc/metrics.json"), "cannot create a file in /proc ("
    else:
        (tmp_path / "afile").write_text("mine")
        out, reason = tmp_path / "afile" / "sub" / "metrics.json", f"{tmp_path / 'afile'} is not a directory"
    result = run_cli("evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output", out)
    assert (result.code, result.out, ran) == (2, "", []), result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kerasllm: error: --output {out}: {reason}"), lines
    if where != "proc":
        assert (tmp_path / "afile").read_text() == "mine"


def test_a_write_that_fails_after_the_evaluation_keeps_the_metrics_on_standard_output(run_cli, tmp_path,
                                                                                       evaluations):
    ran, evaluate = evaluations
    out = tmp_path / "results" / "metrics.json"

    def lose_the_directory():  # e.g. removed (or its disk filled) while the evaluation ran
        out.parent.rmdir()
        out.parent.write_text("")

    evaluate.during = lose_the_directory
    result = run_cli("evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output", out)
    assert (result.code, json.loads(result.out), len(ran)) == (1, METRICS, 1), result
    assert result.err.splitlines() == [f"kerasllm: error: --output {out}: cannot write the metrics (Not a directory); "
                                       "they are on standard output above"]


def test_an_output_through_a_link_or_a_descriptor_is_written_there(run_cli, tmp_path, evaluations):
    """A symbolic link --output had been replaced by a regular file (the partial file's rename), the
    metrics never reaching its target; /dev/stdout as root would have replaced the system's link."""
    import os

    target = tmp_path / "kept" / "metrics.json"
    target.parent.mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(target)
    args = ["evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output"]
    assert run_cli(*args, link).code == 0
    assert link.is_symlink() and json.loads(target.read_text()) == METRICS
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    read, write = os.pipe()
    try:
        assert run_cli(*args, f"/dev/fd/{write}").code == 0
        os.close(write)
        with os.fdopen(read) as pipe:
            assert json.loads(pipe.read()) == METRICS
    finally:
        for fd in (read, write):
            try:
                os.close(fd)
            except OSError:
                pass


def test_a_closed_standard_output_is_refused_before_the_evaluation(run_cli, tmp_path, evaluations, monkeypatch):
    """With stdout closed (`>&-`) the metrics had gone nowhere, exit 0."""
    import sys

    ran, _ = evaluations
    monkeypatch.setattr(sys, "stdout", None)
    result = run_cli("evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv")
    assert (result.code, result.err.splitlines()) == (2, [
        "kerasllm: error: standard output is closed: pass --output FILE"]), result
    assert ran == []
    out = tmp_path / "metrics.json"
    assert run_cli("evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output", out).code == 0
    assert json.loads(out.read_text()) == METRICS


def test_a_standard_output_that_fails_still_gets_the_output_file_written(run_cli, tmp_path, evaluations, monkeypatch):
    """A failing stdout (a full disk under `> log`) had skipped the --output file too: both lost."""
    import click

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(click, "echo", lambda message=None, err=False, **kw: full() if not err else
                        print(message, file=__import__("sys").stderr))
    out = tmp_path / "metrics.json"
    result = run_cli("evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output", out)
    assert (result.code, result.err.splitlines()) == (1, [
        f"kerasllm: error: standard output: cannot write the metrics (No space left on device); they are in {out}"]), \
        result
    assert json.loads(out.read_text()) == METRICS


def test_an_existing_output_is_replaced_only_with_overwrite_and_never_inside_the_model(run_cli, tmp_path,
                                                                                       evaluations):
    """`--output runs/clf/config.json` had replaced the model's config with the metrics (exit 0: the run
    could no longer be loaded, exported or resumed); any other existing file without a word."""
    ran, _ = evaluations
    (tmp_path / "model" / "config.json").write_text('{"task": "classifier"}')
    args = ["evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output"]
    inside = tmp_path / "model" / "config.json"
    for extra in ([], ["--overwrite"]):
        result = run_cli(*args, inside, *extra)
        assert (result.code, result.err.splitlines()) == (2, [
            f"kerasllm: error: --output {inside} is a file of {tmp_path / 'model'}, the model being evaluated"]), result
    assert (tmp_path / "model" / "config.json").read_text() == '{"task": "classifier"}'
    new = tmp_path / "model" / "metrics.json"  # a new file beside the model is the user's to write
    assert run_cli(*args, new).code == 0 and json.loads(new.read_text()) == METRICS

    mine = tmp_path / "metrics.json"
    mine.write_text('{"model": "the previous one"}')
    result = run_cli(*args, mine)
    assert (result.code, result.err.splitlines()) == (2, [
        f"kerasllm: error: {mine} exists: add --overwrite to replace it"]), result
    assert mine.read_text() == '{"model": "the previous one"}' and len(ran) == 1  # refused before the evaluation
    assert run_cli(*args, mine, "--overwrite").code == 0
    assert json.loads(mine.read_text()) == METRICS


def test_an_output_that_is_a_fifo_or_a_device_is_written_as_it_is(run_cli, tmp_path, evaluations):
    """The rename of the partial file had put a regular file in the FIFO's place (its reader waited
    forever) and, run as root, in /dev/null's (`--output /dev/null`)."""
    import os
    import threading

    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    args = ["evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output"]
    result = run_cli(*args, fifo)
    reader.join(timeout=30)
    assert result.code == 0 and fifo.is_fifo(), result
    assert json.loads(got[0]) == METRICS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.fifo", "model", "test.tsv"]
    assert run_cli(*args, "/dev/null").code == 0 and Path("/dev/null").is_char_device()


def test_metrics_are_written_as_utf8_as_the_batch_commands_write(run_cli, tmp_path, evaluations, monkeypatch):
    from kerasllm import evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda source, data, **options: {"entity_types": {"人": {"f1": 1.0}}})
    out = tmp_path / "metrics.json"
    result = run_cli("evaluate", tmp_path / "model", "--data", tmp_path / "test.tsv", "--output", out)
    assert result.code == 0 and '"人"' in result.out and '"人"' in out.read_text(encoding="utf-8"), result


def test_data_from_standard_input_is_read_as_dev_stdin(run_cli, tmp_path, evaluations, monkeypatch):
    """`--data -` had been "File '-' does not exist" (the batch commands take `-i -`)."""
    from kerasllm import evaluation

    given = []
    monkeypatch.setattr(evaluation, "evaluate", lambda source, data, **options: given.append(data) or dict(METRICS))
    result = run_cli("evaluate", tmp_path / "model", "--data", "-", "--format", "tsv")
    assert (result.code, json.loads(result.out), given) == (0, METRICS, [Path("/dev/stdin")]), result

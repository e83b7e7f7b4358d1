"""The batch commands' --output under operations (QA round 16, operations angle): a lock held on the
output for the whole job (F2), descriptor paths written without truncation (F3, evaluate too), an
output that is the input through a hard link or standard input (F8), what holds across shardings
(F10, the --help text) and CoNLL input refused by the commands that cannot read it (F12.6).

On the fake predictor of tests/fake_predictor.py (no model), as tests/test_batch_infer.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fake_predictor
from kerasllm.export import batch
from kerasllm.export.predict import PREDICTORS

FAKE = Path(fake_predictor.__file__)
REPO = FAKE.parent.parent
EXPECTED = [{"id": "1", "output": "CBA"}, {"id": "2", "output": "ED"}]


@pytest.fixture(autouse=True)
def fake_predictors(monkeypatch):
    for task in fake_predictor.TASKS:
        monkeypatch.setitem(PREDICTORS, (task, "bundle"), "fake_predictor:load")
    fake_predictor.FakePredictor.devices.clear()


@pytest.fixture
def bundle(tmp_path):
    return fake_predictor.make_bundle(tmp_path / "bundle", "generate")


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("abc\nde\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(FAKE), *map(str, args)], cwd=REPO, **kwargs)


def _in_use(out: Path) -> list[str]:
    return [f"kerasllm: error: {out}: in use by another kerasllm job (it holds a lock on the file until it ends: "
            "wait for it, or choose another --output)"]


# -- F2: one job at a time on an --output ------------------------------------------------------
@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_an_output_another_job_holds_is_refused_and_left_as_it_is(run_cli, bundle, source, tmp_path, flag):
    """Two --resume jobs on one output (a retry beside the first attempt) had both appended: every
    record twice, both exit 0. The lock is what a running job holds (here taken by this process)."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "1", "output": "CBA"}\n')
    with open(out, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli("generate", bundle, "-i", source, "-o", out, flag, "-q")
        assert (result.code, result.err.splitlines()) == (2, _in_use(out)), result
        assert out.read_text() == '{"id": "1", "output": "CBA"}\n'  # nothing appended, nothing truncated
        assert fake_predictor.FakePredictor.devices == []  # refused before the model loaded
        # a job without --resume names the lock too (not "exists: add --resume", which would also be refused)
        result = run_cli("generate", bundle, "-i", source, "-o", out, "-q")
        assert (result.code, result.err.splitlines()) == (2, _in_use(out)), result
    # once the holder is gone, the same command runs
    result = run_cli("generate", bundle, "-i", source, "-o", out, flag, "-q")
    assert result.code == 0, result
    assert read_jsonl(out) == EXPECTED


def test_a_resume_beside_a_running_job_is_refused_and_a_killed_job_leaves_no_lock(tmp_path):
    """The report's repro: a job running, a second started on its output with --resume. It had
    appended beside the first (3282 lines for 3000 records, exit 0)."""
    bundle = fake_predictor.make_bundle(tmp_path / "slow", "generate", delay=0.02)
    source = tmp_path / "in.txt"
    source.write_text("".join(f"prompt {i}\n" for i in range(300)))
    out = tmp_path / "out.jsonl"
    args = ["generate", bundle, "-i", source, "--batch-size", 4, "--window", 16, "-q", "-o", out]
    first = _cli(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out.exists() and out.stat().st_size):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.02)
        second = _cli(*args, "--resume", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, err = second.communicate(timeout=60)
        assert (second.returncode, err.splitlines()) == (2, _in_use(out))
        first.kill()  # SIGKILL: the kernel drops its lock; no lock file is left to clear
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # (the killed job's settings stay beside its output for its --resume: export/job_record.py)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.jsonl.job.json", "in.txt", "out.jsonl", "slow"]
    resumed = _cli(*args, "--resume", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [str(i + 1) for i in range(300)]  # each record once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.jsonl", "slow"]


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_an_output_resume_or_overwrite_names_is_not_made_before_the_model_loads(run_cli, bundle, source, tmp_path,
                                                                                monkeypatch, flag):
    """Made (and locked) before the load, it had stayed empty after a SIGKILL there: an empty output
    that passes for a finished job. A missing one is made by the writer, as without the flag."""
    loaded = fake_predictor.load
    seen = []

    def load(source, **kwargs):
        seen.append(out.exists())
        return loaded(source, **kwargs)

    monkeypatch.setattr(fake_predictor, "load", load)
    out = tmp_path / "sub" / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, flag, "-q")
    assert result.code == 0, result
    assert seen == [False]
    assert read_jsonl(out) == EXPECTED


def test_an_output_another_job_wrote_while_this_one_loaded_is_not_appended_to(run_cli, bundle, source, tmp_path,
                                                                             monkeypatch):
    """A retry (--resume) beside a first attempt that finished while the retry loaded its model: the
    retry had read no output before the load, then appended every record again, both exit 0."""
    loaded = fake_predictor.load
    finished = '{"id": "1", "output": "CBA"}\n{"id": "2", "output": "ED"}\n'

    def load(source, **kwargs):
        out.write_text(finished)  # the first attempt, done meanwhile
        return loaded(source, **kwargs)

    monkeypatch.setattr(fake_predictor, "load", load)
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--resume", "-q")
    assert (result.code, result.err.splitlines()) == (2, [
        f"kerasllm: error: {out} was written by another job while this one started; run this one again (--resume "
        "continues what is there)"]), result
    assert out.read_text() == finished


def test_a_resume_of_a_missing_output_that_fails_before_its_first_line_leaves_nothing(run_cli, bundle, source,
                                                                                     tmp_path, monkeypatch):
    """A job failing at the model load leaves no output behind (none made, or an emptied one removed)."""
    from kerasllm.errors import KerasLLMError

    def fail(source, **kwargs):
        raise KerasLLMError("no model")

    monkeypatch.setattr(fake_predictor, "load", fail)
    out = tmp_path / "sub" / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out, "--resume", "-q")
    assert (result.code, result.err.splitlines()) == (1, ["kerasllm: error: no model"]), result
    assert not out.exists()


def test_the_writer_locks_its_file_and_releases_it_on_close(tmp_path):
    out = tmp_path / "o.jsonl"
    writer = batch.JsonlWriter(out)
    assert batch.output_in_use(out)
    with pytest.raises(batch.OutputInUse):
        batch.JsonlWriter(out, append=True)
    writer.write([{"id": "1", "output": "x"}])
    writer.close()
    assert not batch.output_in_use(out)
    assert read_jsonl(out) == [{"id": "1", "output": "x"}]


# -- F3: descriptor paths are not truncated ----------------------------------------------------
@pytest.mark.parametrize("name", ["/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"])
def test_an_output_naming_standard_output_appends_to_the_log_the_shell_opened(bundle, source, tmp_path, name):
    """`-o /dev/stdout >> job.log` had reopened the log with "wb", emptying what earlier steps wrote."""
    log = tmp_path / "job.log"
    log.write_text("previous log line 1\nprevious log line 2\n")
    with open(log, "ab") as stdout:
        proc = _cli("generate", bundle, "-i", source, "-o", name, "-q", stdout=stdout, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = log.read_text().splitlines()
    assert lines[:2] == ["previous log line 1", "previous log line 2"]
    assert [json.loads(line) for line in lines[2:]] == EXPECTED


def test_an_output_naming_standard_output_shares_the_offset_of_standard_error(bundle, source, tmp_path):
    """`> log 2>&1`: one offset for both streams; the summary on stderr comes after the lines, not over them."""
    log = tmp_path / "job.log"
    with open(log, "wb") as both:
        proc = _cli("generate", bundle, "-i", source, "-o", "/dev/stdout", stdout=both, stderr=both)
        assert proc.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    # (a line may follow the progress bar's first state, which ends in a carriage return, not a newline)
    assert [json.loads(line[line.index('{"id"'):]) for line in lines if '{"id"' in line] == EXPECTED, lines
    assert "2 records, 0 errors" in lines[-1], lines


def test_evaluate_output_to_standard_output_appends_to_the_log(tmp_path):
    """`kerasllm evaluate ... --output /dev/stdout >> job.log` had emptied the log ("w")."""
    (tmp_path / "model").mkdir()
    (tmp_path / "test.tsv").write_text("text\tlabel\ngood\tpositive\n")
    script = ("import sys; from kerasllm import evaluation\n"
              "evaluation.evaluate = lambda source, data, **o: {'count': 2, 'accuracy': 0.5}\n"
              "from kerasllm.cli import main; main(sys.argv[1:])\n")
    log = tmp_path / "job.log"
    log.write_text("previous log line\n")
    with open(log, "ab") as stdout:
        proc = subprocess.run([sys.executable, "-c", script, "evaluate", str(tmp_path / "model"), "--data",
                               str(tmp_path / "test.tsv"), "-q", "--output", "/dev/stdout"],
                              stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("previous log line\n"), text
    assert text.count('"accuracy": 0.5') == 2  # printed, then written to --output (the same stream)


# -- F8: the input through a hard link or standard input ---------------------------------------
def test_an_output_hard_linked_to_the_input_is_refused(run_cli, bundle, source, tmp_path):
    """It compared paths: `--overwrite` truncated the input while it was read (exit 0, prompts lost)."""
    link = tmp_path / "out.jsonl"
    os.link(source, link)
    for flag in ("--overwrite", "--resume"):
        result = run_cli("generate", bundle, "-i", source, "-o", link, flag, "-q")
        assert (result.code, result.err.splitlines()) == (2, [f"kerasllm: error: {link} is also the input"]), result
    assert source.read_text() == "abc\nde\n"
    assert fake_predictor.FakePredictor.devices == []


def test_an_output_that_standard_input_is_redirected_from_is_refused(bundle, source):
    """`-i - < FILE -o FILE --overwrite`: the same, through standard input."""
    with open(source, "rb") as stdin:
        proc = _cli("generate", bundle, "-i", "-", "-o", source, "--overwrite", "-q", stdin=stdin,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.splitlines()) == (2, [f"kerasllm: error: {source} is also the input"])
    assert source.read_text() == "abc\nde\n"
    # another file as the output, standard input still that file: runs
    other = source.parent / "other.jsonl"
    with open(source, "rb") as stdin:
        proc = _cli("generate", bundle, "-i", "-", "-o", other, "-q", stdin=stdin, stderr=subprocess.PIPE)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert read_jsonl(other) == EXPECTED


# -- F10: what --help says holds across shardings -------------------------------------------------
def test_shard_help_does_not_promise_seeded_sampling_equal_across_shardings(run_cli):
    result = run_cli("generate", "--help")
    text = " ".join(result.out.split())
    assert "equal the unsharded output, but for seeded sampling (repeatable for the same sharding and --window, " \
           "not across shardings)" in text, text


# -- F12.6: CoNLL input where no CoNLL is read ------------------------------------------------------
@pytest.mark.parametrize("task", ["generate", "translate", "classify", "embed"])
def test_conll_input_is_refused_by_the_commands_that_cannot_read_it(run_cli, tmp_path, task):
    """Accepted, then every sentence became an error record (missing field 'text', exit 1)."""
    bundle = fake_predictor.make_bundle(tmp_path / "b", task)
    conll = tmp_path / "in.conll"
    conll.write_text("Anna B-PER\nsaw O\n\nBob B-PER\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(task, bundle, "-i", conll, "-o", out, "--format", "conll")
    assert (result.code, result.err.splitlines()) == (2, [
        f"kerasllm: error: --format conll: CoNLL input (a word a line) is read by `kerasllm tag`; {task} reads "
        "text, JSONL, TSV or CSV (see --format)"]), result
    result = run_cli(task, bundle, "-i", conll, "-o", out)  # by its suffix
    assert (result.code, result.err.splitlines()) == (2, [
        f"kerasllm: error: {conll}: a .conll file: CoNLL input (a word a line) is read by `kerasllm tag`; {task} "
        "reads text, JSONL, TSV or CSV (see --format)"]), result
    assert not out.exists() and fake_predictor.FakePredictor.devices == []
    # tag still reads it
    tagger = fake_predictor.make_bundle(tmp_path / "t", "tag")
    result = run_cli("tag", tagger, "-i", conll, "-o", out, "-q")
    assert result.code == 0, result
    assert [r["tokens"] for r in read_jsonl(out)] == [["Anna", "saw"], ["Bob"]]


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_an_output_removed_or_replaced_while_the_job_writes_it_is_an_error(tmp_path, how):
    """The job had ended "N records, 0 errors", exit 0, with nothing on disk."""
    from kerasllm.errors import KerasLLMError

    out = tmp_path / "out.jsonl"
    writer = batch.JsonlWriter(out)
    writer.write([{"id": "1", "output": "x"}])
    if how == "removed":
        out.unlink()
    else:
        (tmp_path / "other").write_text("")
        os.replace(tmp_path / "other", out)
    with pytest.raises(KerasLLMError, match=f"{out}: the output was removed or replaced while the job wrote it"):
        writer.close()
    kept = batch.JsonlWriter(tmp_path / "kept.jsonl")
    kept.write([{"id": "1"}])
    kept.close()  # (a file left alone closes as before)
    assert read_jsonl(tmp_path / "kept.jsonl") == [{"id": "1"}]


def test_outputs_that_are_not_regular_files_get_no_job_record(tmp_path):
    """`-o /dev/null` had written /dev/.null.job.json (refused to anyone but root: "Permission denied:
    '/dev/.null.job.json.partial'"); a FIFO cannot be resumed either."""
    from kerasllm.export import job_record

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert job_record.record_path("/dev/null") is None and job_record.record_path(str(fifo)) is None
    assert job_record.record_path(str(tmp_path / "out.jsonl")) == tmp_path / ".out.jsonl.job.json"


def test_a_job_record_that_cannot_be_kept_is_a_warning_and_the_job_runs(run_cli, bundle, source, tmp_path,
                                                                        monkeypatch):
    """An output the user may write in a directory they may not: the job had stopped at the record's
    partial file ("[Errno 13] Permission denied: '.out.jsonl.job.json.partial'")."""
    from kerasllm.export import job_record

    def unwritable(path, record):
        partial = path.with_name(path.name + ".partial")
        try:
            raise PermissionError(13, "Permission denied", str(partial))
        except OSError as err:
            return err.strerror

    monkeypatch.setattr(job_record, "write", unwritable)
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", bundle, "-i", source, "-o", out)
    assert result.code == 0 and read_jsonl(out) == EXPECTED, result
    assert (f"kerasllm: warning: cannot keep this job's settings beside {out} (Permission denied): a --resume of it "
            "will not check") in result.err


def test_progress_on_a_standard_error_that_is_not_a_terminal_is_plain_lines(run_cli, bundle, source, tmp_path,
                                                                            monkeypatch):
    """tqdm's carriage-return frames had grown into one endless line of a log, each warning line after them."""
    from kerasllm.cli.infer import LogProgress

    monkeypatch.setattr(LogProgress, "every", 0.0)
    result = run_cli("generate", bundle, "-i", source, "-o", tmp_path / "out.jsonl")
    assert result.code == 0 and "\r" not in result.err, result
    assert re.search(r"^kerasllm: generate: 2/2 records \([\d.]+ rec/s\)$", result.err, re.MULTILINE), result.err
    assert result.err.splitlines()[-1].startswith("kerasllm: generate: 2 records, 0 errors")


def test_onnx_runtime_out_of_memory_at_load_is_not_a_broken_graph():
    from kerasllm.export import runtime

    assert runtime._out_of_memory(RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Failed to load model "
                                               "with error: std::bad_alloc")) == "std::bad_alloc"
    thread = ("onnxruntime::{anonymous}::PosixThread::PosixThread(...) pthread_create failed, error code: 12 "
              "error msg: Cannot allocate memory")
    assert runtime._out_of_memory(RuntimeError(thread)) == "cannot start a thread: pthread_create error 12"
    assert runtime._out_of_memory(RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Protobuf parsing "
                                               "failed.")) is None


def test_a_reader_that_goes_away_ends_the_job_quietly_with_141(tmp_path):
    """`... | head`: click's own EPIPE handling had exited 1, which reads as "some records failed"."""
    source = tmp_path / "many.txt"
    source.write_text("abc\n" * 50_000)
    proc = _cli("generate", fake_predictor.make_bundle(tmp_path / "b", "generate"), "-i", source, "--window", "64",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline()) == {"id": "1", "output": "CBA"}
    proc.stdout.close()  # as `head -n 1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err and b"error" not in err, err

"""A run that stops after training has begun keeps what it trained: Ctrl-C during the final save,
a diverged loss, a failure of any kind; and a diverged run says so in one line."""

import json
import re

import keras
import pytest

FAST = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--no-jit-compile", "--quiet"]


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]


def test_ctrl_c_during_the_final_save_keeps_the_run_and_resume_writes_the_model(run_cli, corpus_file, tmp_path,
                                                                                monkeypatch):
    """Keras's BackupAndRestore had deleted checkpoints/ when fit ended, before model.keras was
    written: a Ctrl-C (or a peer dying) during the save then left no checkpoint, and the run
    directory, created by this run, was removed whole (config, tokenizer, history, every step)."""
    out = tmp_path / "run"

    def interrupted_save(self, path, *args, **kwargs):
        path.write_bytes(b"torn")  # the save had begun
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", interrupted_save)
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "10",
                     "--eval-interval", "5", "--eval-steps", "1", *FAST)
    assert result.code == 130, result
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "history.jsonl",
                                                     "tokenizer.json", "tokens"]  # no torn .partial file
    assert json.loads((out / "checkpoints" / "training_metadata.json").read_text())["epoch"] == 2
    monkeypatch.undo()

    resumed = run_cli("train", "causal-lm", "--out", out, "--resume", "--quiet")
    assert resumed.code == 0, resumed
    assert (out / "model.keras").is_file() and not (out / "checkpoints").exists()
    assert _steps(out) == [5, 10]  # nothing trained again


def test_a_diverged_run_says_so_in_one_line(run_cli, corpus_file, tmp_path):
    """Keras's TerminateOnNaN had printed "Batch 2: Invalid loss, terminating training" on stdout first."""
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--steps", "40",
                     "--eval-interval", "5", "--eval-steps", "1", "--lr", "1e9", *FAST)
    assert result.code == 1, result
    assert result.out == ""
    assert result.err.splitlines() == ["kerasllm: error: training diverged: loss is nan ; try a lower --lr"]
    # Before its first checkpoint the run is removed, so the advice can be taken with the same --out.
    assert not (tmp_path / "run").exists()
    again = run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--steps", "10",
                    "--eval-interval", "5", "--eval-steps", "1", *FAST)
    assert again.code == 0, again


def test_a_run_that_diverges_after_a_checkpoint_keeps_it_and_resumes_from_it(corpus_file, tmp_path):
    """It had been removed whole; and the interval that went NaN would have been the checkpoint."""
    from kerasllm.errors import KerasLLMError
    from kerasllm.recipes.causal_lm import CausalLMTrainArgs, train_causal_lm

    class NaNWeightsAtStep8(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 7:  # before the 8th step
                for variable in self.model.trainable_variables:
                    variable.assign(variable * float("nan"))

    out = tmp_path / "run"
    args = CausalLMTrainArgs(data=[str(corpus_file)], preset="tiny", steps=15, eval_interval=5, eval_steps=1,
                             batch_size=8, seq_len=32, jit_compile=False)
    with pytest.raises(KerasLLMError, match=rf"^training diverged: loss is nan ; {out} keeps its last checkpoint from "
                                            r"before; train again with a lower --lr and a new --out$"):
        train_causal_lm(args, out, quiet=True, extra_callbacks=[NaNWeightsAtStep8()])
    # The last checkpoint is the one before the NaN interval (step 5), not the NaN state of step 8.
    assert json.loads((out / "checkpoints" / "training_metadata.json").read_text())["epoch"] == 1
    train_causal_lm(CausalLMTrainArgs(), out, resume=True, quiet=True)
    assert (out / "model.keras").is_file() and not (out / "checkpoints").exists()
    assert _steps(out) == [5, 10, 15]


def test_run_directory_removes_a_failed_run_only_while_it_holds_no_progress(tmp_path):
    from kerasllm.recipes.common import run_directory

    def fail(out, *progress):
        with pytest.raises(RuntimeError), run_directory(out, resume=False, is_chief=True):
            (out / "config.json").write_text("{}")
            for name in progress:
                (out / name).mkdir() if name == "checkpoints" else (out / name).write_text("x")
            raise RuntimeError

    fail(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()  # failed before its first step: nothing half-written left
    # Nor before its first checkpoint: its history alone is nothing to resume from, and a kept
    # directory would refuse the same command (say with a lower --lr after a divergence) run again.
    fail(tmp_path / "history", "history.jsonl")
    assert not (tmp_path / "history").exists()
    for name in ["checkpoints", "model.keras"]:  # model.keras: checkpoints already removed
        fail(tmp_path / name, name)
        assert (tmp_path / name / name).exists() and (tmp_path / name / "config.json").exists(), name


def test_a_resumed_run_records_the_data_paths_it_was_given_again(tmp_path):
    """`--resume --data NEW` had trained on NEW but left config.json naming the gone path, so a
    second interruption needed --data again."""
    from kerasllm.recipes.classifier import ClassifierTrainArgs
    from types import SimpleNamespace

    from kerasllm.recipes.common import resumed_args, run_directory, train_record, write_run_files

    out = tmp_path / "run"
    out.mkdir()
    run = {"task": "classifier", "model": {"x": 1}, "train": train_record(ClassifierTrainArgs(data=["/gone.tsv"]))}
    (out / "config.json").write_text(json.dumps(run))
    new = tmp_path / "moved.tsv"
    new.write_text("text\tlabel\n")
    args = resumed_args(ClassifierTrainArgs, "classifier", run, out, data=[str(new)])
    with run_directory(out, resume=True, is_chief=False) as held:
        # the other workers of a multi-worker job never write the run directory
        write_run_files(held, resume=True, dist=SimpleNamespace(is_chief=False), args=args, task="classifier",
                        config=None, tokenizers=())
    assert json.loads((out / "config.json").read_text()) == run
    with run_directory(out, resume=True, is_chief=True) as held:
        write_run_files(held, resume=True, dist=SimpleNamespace(is_chief=True), args=args, task="classifier",
                        config=None, tokenizers=())
    assert json.loads((out / "config.json").read_text()) == {**run, "train": {**run["train"], "data": [str(new)]}}


def test_of_two_runs_started_together_into_one_out_the_second_is_refused(run_cli, corpus_file, tmp_path, monkeypatch):
    """Both had passed the check that --out is empty, both had tokenized, then trained into the same
    directory and said "model written": the first run's model and history replaced by the second's.
    Run B starts here while run A trains its tokenizer, between A's check and its first write."""
    from kerasllm.errors import UsageError
    from kerasllm.recipes import causal_lm
    from kerasllm.recipes.causal_lm import CausalLMTrainArgs, train_causal_lm

    out = tmp_path / "same"
    train_tokenizer = causal_lm.train_corpus_tokenizer
    second = []

    def start_run_b_meanwhile(*args, **kwargs):
        if not second:
            second.append(None)
            args_b = CausalLMTrainArgs(data=[str(corpus_file)], tokenizer="byte", steps=2, eval_interval=2,
                                       eval_steps=1, batch_size=8, seq_len=32, jit_compile=False)
            with pytest.raises(UsageError) as refused:
                train_causal_lm(args_b, out, quiet=True)
            second[0] = str(refused.value)
        return train_tokenizer(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "train_corpus_tokenizer", start_run_b_meanwhile)
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "4", "--eval-interval", "2",
                     "--eval-steps", "1", "--tokenizer", "char", *FAST)
    assert second == [f"{out} exists and is not empty; choose a new --out or pass --resume"]
    assert result.code == 0, result
    assert json.loads((out / "config.json").read_text())["train"]["tokenizer"] == "char"  # A's, whole
    assert _steps(out) == [2, 4]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "history.jsonl", "model.keras", "tokenizer.json",
                                                     "tokens"]  # the lock is gone with the run


def test_a_run_directory_held_by_another_process_is_refused_and_left_to_it(run_cli, corpus_file, tmp_path):
    """The lock is the kernel's (flock): held while the other run lives, whatever its state."""
    import fcntl
    import os

    from kerasllm.errors import UsageError
    from kerasllm.training import LOCK_FILE, run_dir_lock

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # another run, between its check and its first write
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "2", *FAST)
        assert result.code == 2, result
        assert result.err.splitlines() == [f"kerasllm: error: {out} exists and is not empty; choose a new --out or "
                                           "pass --resume"]
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # the other run's, untouched
        (out / "config.json").write_text("{}")
        with pytest.raises(UsageError, match=rf"^--resume: {out} is in use by another kerasllm run$"):
            with run_dir_lock(out, resume=True):
                pass
    finally:
        os.close(fd)


def test_the_lock_file_of_a_killed_run_locks_nothing(run_cli, corpus_file, tmp_path):
    """A run killed before it wrote anything (SIGKILL, an XLA abort) leaves its lock file: the same
    command, or a restarted multi-worker job, starts again; the lock is gone once it has run."""
    from kerasllm.training import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("")
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "2", "--eval-interval",
                     "2", "--eval-steps", "1", *FAST)
    assert result.code == 0, result
    assert (out / "model.keras").is_file() and not (out / LOCK_FILE).exists()


def test_ctrl_c_while_a_checkpoint_is_written_leaves_a_run_that_resumes(run_cli, corpus_file, tmp_path, monkeypatch):
    """Keras wrote latest.weights.h5 in place: a Ctrl-C during that write left a valid HDF5 file holding
    part of the weights, and every --resume failed with a ValueError traceback (Keras falls back to
    .bkp on OSErrors only). The checkpoint is now written beside and renamed into place; and one torn
    before that (a run of an older version) is read from its .bkp."""
    import h5py

    out = tmp_path / "run"
    saves = []
    original = keras.Model.save_weights

    def interrupted_second_save(self, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # the second checkpoint: half written, then the Ctrl-C
            with h5py.File(path, "w") as torn:
                torn.create_group("vars")
            raise KeyboardInterrupt
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", interrupted_second_save)
    args = ["--data", corpus_file, "--out", out, "--steps", "20", "--eval-interval", "5", "--eval-steps", "1", *FAST]
    assert run_cli("train", "causal-lm", *args).code == 130
    monkeypatch.undo()
    checkpoints = out / "checkpoints"
    assert json.loads((checkpoints / "training_metadata.json").read_text())["epoch"] == 1
    assert run_cli("train", "causal-lm", "--out", out, "--resume", "--quiet").code == 0
    assert (out / "model.keras").is_file() and _steps(out) == [5, 10, 15, 20]


def test_a_torn_checkpoint_of_an_older_version_resumes_from_its_backup(run_cli, corpus_file, tmp_path, monkeypatch):
    import h5py

    from kerasllm import training

    out = tmp_path / "run"
    original = training.ProgressLogger.on_train_batch_end

    def stop_at_step_12(self, batch, logs=None):
        original(self, batch, logs)
        if self.step == 12:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", stop_at_step_12)
    args = ["--data", corpus_file, "--out", out, "--steps", "20", "--eval-interval", "5", "--eval-steps", "1", *FAST]
    assert run_cli("train", "causal-lm", *args).code == 130
    monkeypatch.undo()
    latest = out / "checkpoints" / "latest.weights.h5"
    assert (out / "checkpoints" / "latest.weights.h5.bkp").is_file()
    with h5py.File(latest, "r+") as weights:  # what an in-place write cut short leaves: a part of the groups
        for name in list(weights.keys())[:-1]:
            del weights[name]
    resumed = run_cli("train", "causal-lm", "--out", out, "--resume", "--quiet")
    assert resumed.code == 0, resumed
    assert (out / "model.keras").is_file() and _steps(out)[-1] == 20


def _train_until(tmp_path, corpus_file, out, ready, *options, signum=None):
    """`kerasllm train causal-lm` in a subprocess, sent SIGTERM once `ready()` holds; its result."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "KERASLLM_XLA_CACHE": "off"}
    process = subprocess.Popen([sys.executable, "-m", "kerasllm", "train", "causal-lm", "--data", str(corpus_file),
                                "--out", str(out), "--steps", "100000", *options, *FAST],
                               stderr=subprocess.PIPE, text=True, env=env,
                               # the default actions, whatever this runner inherited (`nohup`: SIGHUP ignored)
                               preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGHUP,
                                                                                             signal.SIGTERM)])
    deadline = time.monotonic() + 240
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signum or signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"still training 120 s after SIGTERM:\n{process.communicate()[1][-3000:]}") from None
    return process.returncode, err


def test_sigterm_before_the_first_checkpoint_leaves_nothing_behind(tmp_path, corpus_file):
    """SIGTERM (a job manager, `timeout`) had killed a training where it stood: a run stopped in
    its first interval left config, tokenizer and history, and the same command was then refused
    ("exists and is not empty"). It now stops as Ctrl-C does: one line, exit 143, nothing left."""
    out = tmp_path / "run"
    code, err = _train_until(tmp_path, corpus_file, out, lambda: (out / "history.jsonl").exists(),
                             "--eval-interval", "50000", "--eval-steps", "1")
    assert (code, err.splitlines()[-1:]) == (143, ["kerasllm: stopped by SIGTERM"]), err
    assert not out.exists()


def test_a_sigterm_whose_exception_python_dropped_still_stops_the_training(tmp_path, corpus_file, run_cli,
                                                                            monkeypatch):
    """Python runs a signal handler between any two bytecodes, also inside a `__del__`, where the
    handler's exception is printed and dropped: a CI run's training had gone on for 120 s after
    its SIGTERM. The signal is remembered and raised again at the next step."""
    import signal  # noqa: PLC0415

    from kerasllm import signals, training  # noqa: PLC0415

    original = training.ProgressLogger.on_train_batch_end

    def drop_the_handlers_exception(self, batch, logs=None):  # what the handler leaves when its raise is lost
        original(self, batch, logs)
        if self.step == 10:
            signals.received = signal.SIGTERM

    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", drop_the_handlers_exception)
    out = tmp_path / "run"
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "60",
                     "--eval-interval", "1000", "--eval-steps", "1", *FAST)
    assert (result.code, result.err.splitlines()[-1:]) == (143, ["kerasllm: stopped by SIGTERM"]), result
    assert not out.exists() and signals.received is None


def test_sighup_stops_a_training_as_sigterm_does(tmp_path, corpus_file):
    """SIGHUP (a closed terminal or SSH session) had kept its default action: a run stopped in its
    first interval left its directory, which the same command then refused."""
    import signal  # noqa: PLC0415

    out = tmp_path / "run"
    code, err = _train_until(tmp_path, corpus_file, out, lambda: (out / "history.jsonl").exists(),
                             "--eval-interval", "50000", "--eval-steps", "1", signum=signal.SIGHUP)
    assert (code, err.splitlines()[-1:]) == (129, ["kerasllm: stopped by SIGHUP"]), err
    assert not out.exists()


def test_sigterm_after_a_checkpoint_keeps_the_run_for_resume(tmp_path, corpus_file, run_cli):
    out = tmp_path / "run"
    code, err = _train_until(tmp_path, corpus_file, out, lambda: (out / "checkpoints" / "training_metadata.json").exists(),
                             "--eval-interval", "10", "--eval-steps", "1")
    assert (code, err.splitlines()[-1:]) == (143, ["kerasllm: stopped by SIGTERM"]), err
    assert (out / "checkpoints" / "latest.weights.h5").is_file() and not (out / "model.keras").exists()
    assert not (out / "checkpoints" / "partial.weights.h5").exists()


def test_a_disk_without_room_for_the_checkpoint_is_one_line_and_leaves_nothing(tmp_path, corpus_file, run_cli,
                                                                                 monkeypatch):
    """A disk that filled while h5py wrote the first checkpoint had printed ~70 tracebacks from h5py's
    destructors, then died of a segmentation fault with the run directory left behind (the same
    command then refused as "exists and is not empty"). The checkpoint's room is checked first."""
    import shutil

    disk_usage = shutil.disk_usage
    out = tmp_path / "run"

    def full_under_the_run(path):
        usage = disk_usage(path)
        return usage._replace(free=2**20) if str(path).startswith(str(out)) else usage

    monkeypatch.setattr(shutil, "disk_usage", full_under_the_run)
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "8",
                     "--eval-interval", "4", "--eval-steps", "1", *FAST)
    assert result.code == 1 and len(result.err.splitlines()) == 1, result
    assert re.fullmatch(rf"kerasllm: error: {re.escape(str(out))}/checkpoints: no space left for the checkpoint "
                        r"\([\d.,]+ MiB needed, 1\.0 MiB free\): free space there, then --resume\n", result.err), result
    assert not out.exists()


def test_a_disk_that_fills_during_the_token_cache_is_one_line(tmp_path, corpus_file, run_cli, monkeypatch):
    """numpy's short write had read "42793 requested and 26624 written", naming no file nor the disk."""
    def short_write(*args, **kwargs):
        raise OSError("42793 requested and 26624 written")

    monkeypatch.setattr("kerasllm.token_cache.move_tail", short_write)
    out = tmp_path / "run"
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "8", *FAST)
    assert result.code == 1 and len(result.err.splitlines()) == 1, result
    assert re.fullmatch(rf"kerasllm: error: {re.escape(str(out))}/tokens: cannot write the token cache "
                        r"\(42793 requested and 26624 written; .+ free there\)\n", result.err), result
    assert not out.exists()


def test_a_checkpoint_needs_room_for_one_checkpoint_once_its_backup_exists(tmp_path, monkeypatch):
    """The check had asked for twice a checkpoint's size at every checkpoint: the copy of the last one
    to `.bkp` frees the older `.bkp`, so only the second checkpoint needs twice."""
    import shutil

    from kerasllm import CausalLM, DecoderConfig
    from kerasllm.errors import KerasLLMError
    from kerasllm.training import RunBackup

    model = CausalLM(DecoderConfig.preset("tiny", vocab_size=64))
    model.compile()
    model.optimizer.build(model.trainable_variables)
    backup = RunBackup(tmp_path / "checkpoints")
    backup.set_model(model)
    size = sum(v.numpy().nbytes for v in [*model.weights, *model.optimizer.variables])
    disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk_usage(path)._replace(free=int(size * 1.5) + 2**20))
    backup._check_space(tmp_path / "checkpoints")  # the first checkpoint: one size
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.weights.h5").write_bytes(b"w")
    with pytest.raises(KerasLLMError, match="no space left for the checkpoint"):
        backup._check_space(tmp_path / "checkpoints")  # the second: its copy to .bkp and the new one
    (tmp_path / "checkpoints" / "latest.weights.h5.bkp").write_bytes(b"w")
    backup._check_space(tmp_path / "checkpoints")  # from the third on: one size again


def test_validation_falls_every_so_many_epochs_and_at_the_last():
    from kerasllm.training import ValidationEpochs

    epochs = ValidationEpochs(3, 10)
    assert [e for e in range(1, 11) if e in epochs] == [3, 6, 9, 10]

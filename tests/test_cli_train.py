"""`kerasllm` CLI: help, train end to end, resume, and every bad input of the foundation issue."""

import json

import keras
import numpy as np
import pytest

from kerasllm.cli import COMMANDS, cli

FAST = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--no-jit-compile", "--quiet"]


def test_every_command_has_help_with_an_example(run_cli):
    result = run_cli("--help")
    assert result.code == 0 and "Example:" in result.out
    for name in COMMANDS:
        result = run_cli(name, "--help")
        assert result.code == 0, (name, result)
        assert "Example:" in result.out, name
    train = cli.get_command(None, "train")
    for sub in train.commands:
        result = run_cli("train", sub, "--help")
        assert result.code == 0 and "Example:" in result.out, sub


def test_train_writes_a_complete_run_directory(run_cli, corpus_file, tmp_path):
    out = tmp_path / "run"
    # 35 steps validated every 15: the last interval is cut short (5 steps), not rounded up to 45
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "35",
                     "--eval-interval", "15", "--eval-steps", "2", *FAST)
    assert result.code == 0, result
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "history.jsonl", "model.keras",
                                                     "tokenizer.json", "tokens"]
    assert sorted(p.name for p in (out / "tokens").iterdir()) == ["tokens.json", "train.bin", "validation.bin"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history]
    assert steps == sorted(set(steps)) and steps[-1] == 35
    assert [h["step"] for h in history if "val_loss" in h] == [15, 30, 35]
    assert all(h["tokens_per_s"] >= 0 and np.isfinite(h["loss"]) for h in history)
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "causal-lm" and config["train"]["steps"] == 35
    model = keras.models.load_model(out / "model.keras")
    assert model.config.vocab_size == config["model"]["vocab_size"]


def test_a_run_without_steps_or_epochs_says_it_makes_one_pass(run_cli, tmp_path, caplog):
    """A run of only --data and --out had ended in seconds, exit 0, with a model that had learned next to
    nothing (a seq2seq model's exact match 0.0), and not a word."""
    data = tmp_path / "reviews.tsv"
    assert run_cli("sample-data", "sentiment", "--out", data, "--count", "64").code == 0
    import logging

    caplog.set_level(logging.INFO, logger="kerasllm")
    loud = [option for option in FAST if option != "--quiet"]
    result = run_cli("train", "classifier", "--data", data, "--out", tmp_path / "run", *loud, "--batch-size", "16")
    assert result.code == 0, result
    assert ("3 steps: one pass over the data, the default; a model learns little from one pass over a small "
            "dataset: give --steps or --epochs for a longer run") in caplog.messages, caplog.messages
    # stderr here is no terminal (a log): a line per interval, no progress bar's carriage-return frames
    assert "\r" not in result.err and [line.split(":")[0] for line in result.err.splitlines()
                                       if line.startswith("step ")] == ["step 3/3"], result.err
    caplog.clear()
    longer = run_cli("train", "classifier", "--data", data, "--out", tmp_path / "run2", *loud, "--steps", "2")
    assert longer.code == 0 and not [m for m in caplog.messages if "one pass" in m], longer


def test_resume_continues_from_the_last_checkpoint(run_cli, corpus_file, tmp_path, monkeypatch):
    from kerasllm import training

    out = tmp_path / "run"
    original = training.ProgressLogger.on_train_batch_end

    def crash_at_step_25(self, batch, logs=None):
        original(self, batch, logs)
        if self.step == 25:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", crash_at_step_25)
    args = ["train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "40", "--eval-interval", "10",
            "--eval-steps", "1", *FAST]
    interrupted = run_cli(*args)
    assert interrupted.code == 130
    assert not (out / "model.keras").exists() and (out / "checkpoints").is_dir()
    monkeypatch.setattr(training.ProgressLogger, "on_train_batch_end", original)

    # The resumed run reads the token cache: no tokenizer trained, no file tokenized, the .bin files untouched.
    from kerasllm import token_cache
    from kerasllm.tokenizers import TextTokenizer

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "tokens").iterdir()}
    monkeypatch.setattr(TextTokenizer, "train", None)
    monkeypatch.setattr(token_cache, "document_ids", None)
    resumed = run_cli("train", "causal-lm", "--out", out, "--resume", "--quiet")
    assert resumed.code == 0, resumed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "tokens").iterdir()} == stamps
    monkeypatch.undo()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history]
    # Steps 21..25 ran before the crash but after the last checkpoint (step 20): they are
    # dropped from the history and run again, so every step appears once, up to 40.
    assert steps == sorted(set(steps)) and steps[-1] == 40
    assert [h["step"] for h in history if "val_loss" in h] == [10, 20, 30, 40]
    assert (out / "model.keras").is_file() and not (out / "checkpoints").exists()
    # A finished run cannot be resumed, and a non-empty --out is not overwritten.
    assert run_cli("train", "causal-lm", "--out", out, "--resume").code == 2
    again = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, *FAST)
    assert again.code == 2 and "holds a finished run" in again.err


def _bad_inputs(tmp_path, corpus_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    no_text = tmp_path / "no_text"
    no_text.mkdir()
    (no_text / "image.png").write_bytes(b"\x89PNG")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"family": "decoder", "num_layers": 2, "hidden_size": 64}))
    return [
        (["--data", tmp_path / "missing.txt"], 2, "does not exist"),
        (["--data", empty], 1, "file is empty"),
        (["--data", no_text], 1, "holds no text files"),
        (["--data", latin1], 1, "line 2, column 4: not valid UTF-8"),
        (["--data", corpus_file, "--seq-len", "4096"], 2, "larger than the model's max_length"),
        (["--data", corpus_file, "--config", config], 2, "unknown key 'hidden_size'"),
        ([], 2, "--data is required"),
    ]


def test_bad_inputs_give_one_clear_line_and_leave_nothing(run_cli, corpus_file, tmp_path):
    for extra, code, message in _bad_inputs(tmp_path, corpus_file):
        out = tmp_path / "never"
        result = run_cli("train", "causal-lm", "--out", out, "--steps", "2", "--quiet", "--no-jit-compile", *extra)
        assert result.code == code, (extra, result)
        assert message in result.err, (extra, result.err)
        assert "Traceback" not in result.err
        assert len([line for line in result.err.splitlines() if line.strip()]) <= 3, result.err
        assert not out.exists(), extra


def test_sample_data_is_deterministic(run_cli, tmp_path):
    for kind, name in [("corpus", "a.txt"), ("numbers", "n.jsonl"), ("sentiment", "s.tsv")]:
        assert run_cli("sample-data", kind, "--out", tmp_path / name, "--count", "50").code == 0
        first = (tmp_path / name).read_bytes()
        assert run_cli("sample-data", kind, "--out", tmp_path / name, "--count", "50", "--overwrite").code == 0
        assert (tmp_path / name).read_bytes() == first and len(first) > 500


def test_export_of_a_directory_without_a_model_is_a_usage_error(run_cli, tmp_path):
    result = run_cli("export", tmp_path, "--out", tmp_path / "bundle")
    assert result.code == 2 and "not a finished model directory" in result.err
    assert not (tmp_path / "bundle").exists()


def test_the_same_seed_trains_the_same_model(run_cli, corpus_file, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out, "--steps", "6",
                         "--eval-interval", "6", "--eval-steps", "1", "--seed", "3", *FAST)
        assert result.code == 0, result
    a, b = (keras.models.load_model(out / "model.keras") for out in outs)
    x = np.arange(6, 26, dtype="int32")[None, :]
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_history_logs_the_mean_loss_since_the_line_before_not_since_the_interval_began(tmp_path):
    """Keras reports the mean loss since its epoch (validation interval) began; the history and the
    progress bar show the mean of the steps since the last line, across intervals too."""
    from kerasllm.training import ProgressLogger

    step_losses = [[4.0, 3.0, 2.0, 2.5, 1.5, 1.0], [0.9, 0.7, 0.8, 0.6, 0.5, 0.4]]  # two intervals of 6 steps
    logger = ProgressLogger(tmp_path / "history.jsonl", steps_per_epoch=6, total_steps=12, tokens_per_step=100,
                            log_every=2, quiet=True)
    logger.set_model(keras.Sequential())
    for epoch, losses in enumerate(step_losses):
        logger.on_epoch_begin(epoch)
        for batch in range(len(losses)):
            running = float(np.mean(losses[:batch + 1]))  # what Keras passes: the mean since the epoch began
            logger.on_train_batch_end(batch, {"loss": running})
        logger.on_epoch_end(epoch, {"loss": running, "val_loss": 0.5})
    logged = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged] == [2, 4, 6, 8, 10, 12]
    expected = [3.5, 2.25, 1.25, 0.8, 0.7, 0.45]  # each pair of steps' mean
    assert [h["loss"] for h in logged] == pytest.approx(expected, rel=1e-9)
    assert [h.get("val_loss") for h in logged] == [None, None, 0.5, None, None, 0.5]


def test_steps_per_execution_keeps_every_logged_step_and_the_same_training(corpus_file, tmp_path):
    """Several steps per call of the train function (training.execution_steps): the history logs the
    same steps, validation comes at the same steps, and the weights equal one step per call."""
    from kerasllm.recipes.causal_lm import CausalLMTrainArgs, train_causal_lm
    from kerasllm.training import execution_steps

    assert execution_steps(10, 100, 2000, 20) == 10  # the defaults
    assert execution_steps(10, 20, 35, 10) == 5  # a cut-short last interval still ends on a call
    assert execution_steps(10, 300, 300, None) == 10 and execution_steps(1, 300, 300, 20) == 1
    runs = {}
    for log_every in (1, 10):  # 1 step per call, then 5 (gcd of 10, 20, 35, 10)
        out = tmp_path / f"log{log_every}"
        args = CausalLMTrainArgs(data=[str(corpus_file)], preset="tiny", steps=35, batch_size=8, seq_len=32,
                                 eval_interval=20, eval_steps=10, jit_compile=False, log_every=log_every)
        history = train_causal_lm(args, out, quiet=True)
        logged = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        runs[log_every] = (keras.models.load_model(out / "model.keras"), logged, history.history)
    (one, one_log, one_hist), (five, five_log, five_hist) = runs[1], runs[10]
    assert [h["step"] for h in five_log] == [10, 20, 30, 35]
    assert [h["step"] for h in five_log if "val_loss" in h] == [20, 35]
    # With one step per line each line is that step's loss; a line of the 5-steps-per-call run is the
    # mean of the steps since its line before (ProgressLogger._window_loss).
    step_loss = {h["step"]: h["loss"] for h in one_log}
    previous = 0
    for record in five_log:
        window = [step_loss[step] for step in range(previous + 1, record["step"] + 1)]
        assert record["loss"] == pytest.approx(np.mean(window), rel=1e-4), record
        previous = record["step"]
    np.testing.assert_allclose(five_hist["val_loss"], one_hist["val_loss"], rtol=1e-5)
    for a, b in zip(one.weights, five.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-5, err_msg=a.path)


XLA_REDUCTION_SCRIPT = """
import os
from kerasllm.cli import configure_tensorflow
configure_tensorflow()
import tensorflow as tf
layer_norm_like = tf.function(lambda x: tf.reduce_sum(x * x, axis=-1), jit_compile=True)
hlo = layer_norm_like.experimental_get_compiler_ir(tf.ones((4, 128)))(stage="optimized_hlo")
print("XLA_FLAGS", os.environ.get("XLA_FLAGS"))
print("REDUCE_WINDOWS", hlo.count("reduce-window("))
"""


def test_the_cli_process_skips_xla_tree_reduction_unless_xla_flags_say_otherwise():
    """configure_tensorflow (run by `kerasllm` before TensorFlow loads) turns off XLA's tree-reduction
    rewrite (kerasllm.cli.XLA_CPU_TRAINING_FLAGS): a 128-wide sum compiles to a plain reduce, no
    reduce-window kernel. A user's own `--xla_disable_hlo_passes` is kept as given: with an empty list
    the rewrite happens, which also shows this XLA still has the pass the flag names."""
    import os
    import subprocess
    import sys

    counts = {}
    for name, user_flags in (("default", None), ("user's own", "--xla_disable_hlo_passes=")):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        if user_flags is not None:
            env["XLA_FLAGS"] = user_flags
        done = subprocess.run([sys.executable, "-c", XLA_REDUCTION_SCRIPT], capture_output=True, text=True,
                              timeout=300, env={**env, "CUDA_VISIBLE_DEVICES": "", "KERASLLM_XLA_CACHE": "off"})
        assert done.returncode == 0, done.stderr[-3000:]
        counts[name] = int(done.stdout.split("REDUCE_WINDOWS")[-1])
        if user_flags is None:
            assert "--xla_disable_hlo_passes=tree_reduction_rewriter" in done.stdout, done.stdout
    assert counts["default"] == 0 and counts["user's own"] >= 1, counts


# -- options beside --resume ------------------------------------------------------------------------
RESUME_REFUSED = ["--steps", "60", "--lr", "0.5", "--batch-size", "3", "--layers", "4", "--seq-len", "16",
                  "--preset", "small", "--no-jit-compile"]


def test_resume_refuses_the_options_it_would_ignore(run_cli, corpus_file, tmp_path, interrupt_training):
    """A resumed run repeats the stopped one with its saved options: options beside --resume (but the
    data, --quiet and where to run) are refused in one line naming them, before anything is read;
    the stopped run is left as it was and resumes with the options it may take."""
    out = tmp_path / "run"
    interrupt_training(6)
    args = ["--out", out, "--steps", "12", "--eval-interval", "4", "--eval-steps", "1", *FAST]
    assert run_cli("train", "causal-lm", "--data", corpus_file, *args).code == 130
    interrupt_training(None)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    refused = run_cli("train", "causal-lm", "--out", out, "--resume", *RESUME_REFUSED)
    assert refused.code == 2, refused
    assert refused.err.splitlines() == [
        f"kerasllm: error: --resume continues the run in {out} with its saved options; drop --preset, --steps, "
        "--batch-size, --seq-len, --lr, --no-jit-compile, --layers "
        "(see 'kerasllm train causal-lm --help')"], refused.err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # A run whose config.json holds settings this version does not know (a newer kerasllm's run, resumed
    # after a rollback): the train section's had ended in a TypeError traceback, the model's named no file.
    saved = json.loads(before["config.json"])
    for section, key, expected in (("train", "new_option", "holds training settings this kerasllm does not know "
                                    "(new_option): the run was started by another (newer) version"),
                                   ("model", "new_field", "model config: unknown key 'new_field' for DecoderConfig")):
        (out / "config.json").write_text(json.dumps({**saved, section: {**saved[section], key: None}}))
        newer = run_cli("train", "causal-lm", "--out", out, "--resume", "--quiet")
        assert newer.code == 2 and len(newer.err.splitlines()) == 1, newer
        assert newer.err.startswith(f"kerasllm: error: --resume: {out / 'config.json'}") and expected in newer.err, newer
    (out / "config.json").write_bytes(before["config.json"])

    resumed = run_cli("train", "causal-lm", "--out", out, "--resume", "--data", corpus_file, "--quiet",
                      "--strategy", "auto")
    assert resumed.code == 0, resumed
    run = json.loads((out / "config.json").read_text())
    assert run["train"]["steps"] == 12 and run["train"]["lr"] == 1e-3 and run["model"]["num_layers"] == 2
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 12


def test_resume_keeps_the_runs_task_and_its_planned_steps(run_cli, corpus_file, tmp_path, interrupt_training):
    """`train classifier --resume` of a stopped causal-lm run had ended in a TypeError traceback; an
    --epochs run resumed with --data of another size had planned its steps again (a smaller file: the
    checkpoint past the new end, "model written" with no step trained and a history line past it)."""
    out = tmp_path / "run"
    interrupt_training(9)
    args = ["--out", out, "--epochs", "0.05", "--eval-interval", "2", "--eval-steps", "1", *FAST]
    assert run_cli("train", "causal-lm", "--data", corpus_file, *args).code == 130
    interrupt_training(None)
    run = json.loads((out / "config.json").read_text())
    planned = run["plan"]["total_steps"]
    assert planned > 9, run  # (a twentieth of the corpus's windows)

    refused = run_cli("train", "classifier", "--out", out, "--resume")
    assert (refused.code, refused.err.splitlines()) == (2, [
        f"kerasllm: error: --resume: {out} holds a causal-lm run, not a classifier one; resume it with "
        f"'kerasllm train causal-lm --out {out} --resume'"]), refused

    smaller = tmp_path / "third.txt"
    smaller.write_text(corpus_file.read_text()[: len(corpus_file.read_text()) // 3])
    # a run saved before its plan was: planned again, its checkpoint (step 8) is past the new end (4)
    (out / "config.json").write_text(json.dumps({k: v for k, v in run.items() if k != "plan"}))
    def kept():  # all but the token cache (tokens/, derived from the data given: its plan needs its size)
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.parent.name != "tokens"}

    before = kept()
    refused = run_cli("train", "causal-lm", "--out", out, "--resume", "--data", smaller)
    assert refused.code == 2, refused
    assert refused.err.splitlines()[-1] == (
        f"kerasllm: error: --resume: {out}'s checkpoint is at step 8, past the 4 steps planned now (from --data of "
        "another size?); resume it with the data it started on")
    # refused before the run is written to: the stopped run as it was (its config.json still naming the data it
    # started on, its history and checkpoint)
    assert before == kept()

    (out / "config.json").write_text(json.dumps(run))
    resumed = run_cli("train", "causal-lm", "--out", out, "--resume", "--data", smaller, "--quiet")
    assert resumed.code == 0, resumed
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, planned + 1)) or steps == list(range(2, planned + 1, 2)) + (
        [planned] if planned % 2 else []), steps
    assert (out / "model.keras").exists() and not (out / "checkpoints").exists()
    assert json.loads((out / "config.json").read_text())["plan"] == {"total_steps": planned}


def test_a_finished_run_is_named_as_one_before_anything_else(run_cli, corpus_file, tmp_path):
    """Training into it had said "exists and is not empty; ... or pass --resume"; `--resume --steps 60` had
    said "drop --steps", and only then that the run had finished."""
    out = tmp_path / "run"
    args = ["--out", out, "--steps", "2", "--eval-interval", "2", "--eval-steps", "1", *FAST]
    assert run_cli("train", "causal-lm", "--data", corpus_file, *args).code == 0
    again = run_cli("train", "causal-lm", "--data", corpus_file, *args)
    assert (again.code, again.err.splitlines()) == (2, [
        f"kerasllm: error: {out} holds a finished run (model.keras is written); choose a new --out"]), again
    for extra in ([], ["--steps", "60"]):
        resumed = run_cli("train", "causal-lm", "--out", out, "--resume", *extra)
        assert (resumed.code, resumed.err.splitlines()) == (2, [
            f"kerasllm: error: --resume: the run in {out} already finished (model.keras is written)"]), resumed


def test_resume_keeps_the_precision_the_run_trained_with(run_cli, corpus_file, tmp_path, interrupt_training):
    """A plain --resume of a mixed-precision run had trained on in fp32 and Keras had dropped the
    checkpoint's optimizer state ("Skipping variable loading for optimizer ..."): the schedule and
    AdamW's moments started over. Now it takes the saved precision, and refuses another."""
    out = tmp_path / "run"
    interrupt_training(6)
    args = ["--out", out, "--steps", "12", "--eval-interval", "4", "--eval-steps", "1", "--precision",
            "mixed_bfloat16", *FAST]
    assert run_cli("train", "causal-lm", "--data", corpus_file, *args).code == 130
    interrupt_training(None)
    assert json.loads((out / "config.json").read_text())["distribute"]["precision"] == "mixed_bfloat16"
    refused = run_cli("train", "causal-lm", "--out", out, "--resume", "--precision", "fp32")
    assert refused.code == 2 and refused.err.splitlines() == [
        f"kerasllm: error: --resume continues the run in {out}, trained with --precision mixed_bfloat16: its "
        "checkpoint holds that precision's optimizer state; drop --precision fp32"], refused.err
    resumed = run_cli("train", "causal-lm", "--out", out, "--resume")
    assert resumed.code == 0, resumed
    assert "Skipping variable loading" not in resumed.err, resumed.err
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 12


@pytest.mark.parametrize("option, value", [("--epochs", "inf"), ("--epochs", "nan"), ("--lr", "nan"),
                                           ("--lr", "inf"), ("--weight-decay", "nan"), ("--label-smoothing", "nan")])
def test_numbers_that_are_not_finite_are_usage_errors(run_cli, corpus_file, tmp_path, option, value):
    """nan passes every range comparison: --lr nan trained until the loss was nan; --epochs inf overflowed."""
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", option, value)
    assert result.code == 2 and result.err.splitlines() == [
        f"kerasllm: error: Invalid value for '{option}': {float(value)} is not a finite number. "
        "(see 'kerasllm train causal-lm --help')"], result.err
    assert not (tmp_path / "run").exists()


def test_tpu_without_the_tpu_strategy_is_refused(run_cli, corpus_file, tmp_path):
    """It had been ignored: the run trained on the CPU with --strategy auto, exit 0."""
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--tpu", "grpc://x:1")
    assert result.code == 2 and "--tpu names the TPU of --strategy tpu" in result.err, result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, extra", [
    ("causal-lm", ["--window", "packed", "--config", "{config}"]),
    ("masked-lm", ["--text-field", "body", "--vocab-size", "300"]),
    ("classifier", ["--label-field", "y", "--pooling", "mean", "--init-from", "{run}"]),
    ("token-classifier", ["--format", "conll", "--label-smoothing", "0.1", "--init-from", "{run}"]),
    ("seq2seq", ["--separate-vocab", "--target-tokenizer", "byte", "--source-field", "en"]),
])
def test_every_train_command_refuses_options_beside_resume(run_cli, tmp_path, command, extra):
    """The same in every `kerasllm train` command: each option given is named, the defaults are not."""
    config = tmp_path / "config.json"
    config.write_text("{}")
    extra = [str(a).format(config=config, run=tmp_path) for a in extra]
    out = tmp_path / "run"
    result = run_cli("train", command, "--out", out, "--resume", "--quiet", *RESUME_REFUSED, *extra)
    assert result.code == 2, result
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err, result.err
    assert result.err.startswith(f"kerasllm: error: --resume continues the run in {out} with its saved options; "
                                 "drop "), result.err
    given = [a for a in RESUME_REFUSED + extra if a.startswith("--")]
    dropped = result.err.split("; drop ")[1].split(" (see")[0].split(", ")
    assert sorted(dropped) == sorted(given), result.err
    assert not out.exists()


# -- --config on top of --preset --------------------------------------------------------------------
@pytest.mark.parametrize("command, kind, data", [
    ("causal-lm", "corpus", "corpus.txt"),
    ("masked-lm", "sentiment", "rows.tsv"),
    ("classifier", "sentiment", "rows.tsv"),
    ("token-classifier", "ner", "ner.jsonl"),
    ("seq2seq", "numbers", "pairs.tsv"),
])
def test_a_partial_config_file_changes_the_preset_it_is_given_with(run_cli, tmp_path, command, kind, data):
    """`--preset small --config c.json` is the small preset with c.json's keys on top (it had been the
    config's defaults, tiny-sized, while config.json recorded preset small), the command line's
    overrides on top of both; without --preset, the default preset (tiny)."""
    from kerasllm.config import PRESETS

    assert run_cli("sample-data", kind, "--out", tmp_path / data, "--count", "40").code == 0
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"dropout": 0.1, "num_layers": 3, "num_heads": 8}))
    family = {"causal-lm": "decoder", "seq2seq": "seq2seq"}.get(command, "encoder")
    # without --preset, the default: checked for one command
    for preset, given in (("small", ["--preset", "small"]), ("tiny", []))[:2 if command == "causal-lm" else 1]:
        out = tmp_path / f"run-{preset}"
        result = run_cli("train", command, "--data", tmp_path / data, "--out", out, "--config", config, *given,
                         "--heads", "2", "--steps", "1", "--eval-steps", "1", "--batch-size", "4", "--seq-len", "64",
                         "--no-jit-compile", "--quiet")
        assert result.code == 0, result
        run = json.loads((out / "config.json").read_text())
        shape = PRESETS[family][preset]
        assert run["train"]["preset"] == preset
        assert {k: run["model"][k] for k in ("hidden_dim", "intermediate_dim", "max_length")} == {
            k: shape[k] for k in ("hidden_dim", "intermediate_dim", "max_length")}, (preset, run["model"])
        assert (run["model"]["num_layers"], run["model"]["dropout"], run["model"]["num_heads"]) == (3, 0.1, 2)


# -- seq2seq --seq-len against the model's max_length -----------------------------------------------
@pytest.fixture
def short_pairs(tmp_path):
    from kerasllm import datasets

    path = tmp_path / "pairs.tsv"
    path.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in datasets.number_words_pairs(
        64, max_value=99, seed=4)), encoding="utf-8")
    return path


def test_seq2seq_refuses_a_seq_len_above_max_length_and_defaults_to_it(run_cli, tmp_path, short_pairs):
    """As the other train commands: an explicit --seq-len above the model's max_length is refused (it
    had been accepted and recorded, seq_len 200 beside max_length 128); not given, it is the model's
    max_length, so `--max-length 32` alone (the README's tour) trains and records seq_len 32."""
    out = tmp_path / "run"
    fast = ["--steps", "1", "--eval-steps", "1", "--batch-size", "8", "--no-jit-compile", "--quiet"]
    for extra, max_length in ((["--seq-len", "200"], 128), (["--seq-len", "40", "--max-length", "32"], 32)):
        result = run_cli("train", "seq2seq", "--data", short_pairs, "--out", out, *extra, *fast)
        assert result.code == 2, result
        assert result.err.splitlines() == [
            f"kerasllm: error: --seq-len {extra[1]} is larger than the model's max_length {max_length}"], result.err
        assert not out.exists()

    for extra, seq_len in ((["--max-length", "32"], 32), (["--max-length", "32", "--seq-len", "24"], 24)):
        out = tmp_path / f"run{seq_len}"
        result = run_cli("train", "seq2seq", "--data", short_pairs, "--out", out, *extra, *fast)
        assert result.code == 0, result
        run = json.loads((out / "config.json").read_text())
        assert (run["train"]["seq_len"], run["model"]["max_length"]) == (seq_len, 32)


def test_seq2seq_run_recorded_with_a_seq_len_above_max_length_still_resumes(run_cli, tmp_path, short_pairs,
                                                                           interrupt_training):
    """Runs stopped before the check recorded the default seq_len 128 beside a smaller max_length (as
    the README's `--max-length 32` run did): they resume, capped at max_length as they began."""
    out = tmp_path / "run"
    interrupt_training(6)
    assert run_cli("train", "seq2seq", "--data", short_pairs, "--out", out, "--max-length", "32", "--steps", "8",
                   "--eval-interval", "4", "--validation-fraction", "0", "--batch-size", "8", "--no-jit-compile",
                   "--quiet").code == 130
    interrupt_training(None)
    run = json.loads((out / "config.json").read_text())
    run["train"]["seq_len"] = 128
    (out / "config.json").write_text(json.dumps(run))
    resumed = run_cli("train", "seq2seq", "--out", out, "--resume", "--quiet")
    assert resumed.code == 0, resumed
    assert [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()][-1]["step"] == 8


# -- paths saved in config.json ----------------------------------------------------------------------
def test_resume_from_another_directory_reads_the_paths_saved_absolute(run_cli, tmp_path, monkeypatch,
                                                                      interrupt_training):
    """config.json had saved --data as typed ("reviews.tsv") and `--resume` read it from the directory
    it was run in: from another one it failed with "reviews.tsv: no such file". Paths are saved
    absolute; a saved one that is gone is named as the one saved in DIR/config.json, with the option
    that gives another, and --data given again is taken."""
    from pathlib import Path

    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    start = Path.cwd()
    assert run_cli("sample-data", "sentiment", "--out", "reviews.tsv", "--count", "40").code == 0
    interrupt_training(6)
    args = ["--steps", "12", "--eval-interval", "4", "--eval-steps", "1", *FAST]
    assert run_cli("train", "classifier", "--data", "reviews.tsv", "--out", "run", *args).code == 130
    assert json.loads((start / "run" / "config.json").read_text())["train"]["data"] == [str(start / "reviews.tsv")]

    monkeypatch.chdir(tmp_path / "elsewhere")
    out = Path("..", "start", "run")
    interrupt_training(10)
    assert run_cli("train", "classifier", "--out", out, "--resume", "--quiet").code == 130  # read the saved path
    interrupt_training(None)
    (start / "reviews.tsv").rename(start / "moved.tsv")
    refused = run_cli("train", "classifier", "--out", out, "--resume", "--quiet")
    assert refused.code == 2 and refused.err.splitlines() == [
        f"kerasllm: error: {start / 'reviews.tsv'} (the --data saved in {out / 'config.json'}): no such file or "
        "directory; pass --data again to read the data from elsewhere"], refused.err
    resumed = run_cli("train", "classifier", "--out", out, "--resume", "--quiet", "--data", start / "moved.tsv")
    assert resumed.code == 0, resumed
    # The path given again is saved: a later --resume reads it without --data.
    assert json.loads((start / "run" / "config.json").read_text())["train"]["data"] == [str(start / "moved.tsv")]
    steps = [json.loads(line)["step"] for line in (start / "run" / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def test_train_record_saves_every_path_absolute_and_resume_names_the_saved_one(tmp_path, monkeypatch):
    """`--init-from` and seq2seq's --source-file/--target-file too; the data given again replaces all the
    saved data (--data in place of the files); other saved options, weight_decay among them, are kept."""
    from kerasllm.errors import UsageError
    from kerasllm.recipes.classifier import ClassifierTrainArgs
    from kerasllm.recipes.common import resumed_args, train_record
    from kerasllm.recipes.seq2seq import Seq2SeqTrainArgs

    monkeypatch.chdir(tmp_path)
    record = train_record(ClassifierTrainArgs(data=["a.tsv", "sub/b.tsv"], init_from="runs/mlm"))
    assert (record["data"], record["init_from"]) == ([str(tmp_path / "a.tsv"), str(tmp_path / "sub" / "b.tsv")],
                                                     str(tmp_path / "runs" / "mlm"))
    record = train_record(Seq2SeqTrainArgs(source_file="train.en", target_file="../train.de", weight_decay=0.3))
    assert (record["data"], record["source_file"], record["target_file"]) == (
        None, str(tmp_path / "train.en"), str(tmp_path.parent / "train.de"))

    run = {"task": "seq2seq", "train": record}
    with pytest.raises(UsageError) as refused:
        resumed_args(Seq2SeqTrainArgs, "seq2seq", run, tmp_path / "run", data=None, source_file=None, target_file=None)
    assert str(refused.value) == (f"{tmp_path / 'train.en'} (the --source-file saved in "
                                  f"{tmp_path / 'run' / 'config.json'}): no such file or directory; pass "
                                  "--source-file and --target-file again to read the data from elsewhere")
    args = resumed_args(Seq2SeqTrainArgs, "seq2seq", run, tmp_path / "run", data="pairs.tsv", source_file=None,
                        target_file=None)
    assert (args.data, args.source_file, args.target_file, args.weight_decay) == ("pairs.tsv", None, None, 0.3)
    saved = train_record(ClassifierTrainArgs(data=[str(tmp_path)], weight_decay=0.1))  # a run saved with 0.1
    assert resumed_args(ClassifierTrainArgs, "classifier", {"task": "classifier", "train": saved}, tmp_path,
                        data=[]).weight_decay == 0.1


# -- each command's defaults are its recipe's --------------------------------------------------------
@pytest.mark.parametrize("command", ["causal-lm", "masked-lm", "classifier", "token-classifier", "seq2seq"])
def test_each_train_command_defaults_to_its_recipes_arguments(command):
    """The encoder recipes' weight_decay 0.01 (BERT's) never reached a CLI run: --weight-decay's default
    was 0.1 for every command, so the CLI and the Python API trained differently. Every option that
    is a field of the recipe's arguments now defaults to that field's default (shown in --help)."""
    import dataclasses

    from kerasllm.recipes import causal_lm, classifier, masked_lm, seq2seq, token_classifier

    args_class = {"causal-lm": causal_lm.CausalLMTrainArgs, "masked-lm": masked_lm.MaskedLMTrainArgs,
                  "classifier": classifier.ClassifierTrainArgs, "seq2seq": seq2seq.Seq2SeqTrainArgs,
                  "token-classifier": token_classifier.TokenClassifierTrainArgs}[command]
    train = cli.get_command(None, "train")
    ctx = train.commands[command].make_context(command, ["--out", "run"])
    defaults = {f.name: f.default for f in dataclasses.fields(args_class) if f.default is not dataclasses.MISSING}
    paths = ("data", "source_file", "target_file")  # a tuple of paths on the command line
    compared = {name: ctx.params[name] for name in defaults if name in ctx.params and name not in paths}
    assert compared == {name: defaults[name] for name in compared}
    assert {"batch_size", "seq_len", "lr", "weight_decay", "eval_interval", "seed"} <= set(compared)
    assert compared["weight_decay"] == (0.1 if command in ("causal-lm", "seq2seq") else 0.01)


# -- evaluate past the trained --seq-len -------------------------------------------------------------
def test_evaluate_says_when_texts_go_past_the_trained_seq_len(run_cli, tmp_path):
    """`kerasllm evaluate` read texts up to the model's max_length and said nothing when they went past
    the --seq-len training cut them at (the metrics then count positions never trained): it prints
    the line `classify` prints, once, on stderr; the metrics stay on stdout."""
    data = tmp_path / "reviews.tsv"
    assert run_cli("sample-data", "sentiment", "--out", data, "--count", "40").code == 0
    run = tmp_path / "run"
    assert run_cli("train", "classifier", "--data", data, "--out", run, "--steps", "1", "--eval-steps", "1",
                   "--preset", "tiny", "--seq-len", "8", "--batch-size", "8", "--no-jit-compile", "--quiet").code == 0
    result = run_cli("evaluate", run, "--data", data, "--batch-size", "16")
    assert result.code == 0, result
    assert json.loads(result.out)["count"] == 40
    warnings = [line for line in result.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("kerasllm: warning: texts reach "), result.err
    assert warnings[0].endswith(" tokens, longer than the --seq-len 8 the model was trained with; results for "
                                "such texts may degrade"), result.err


# -- the closing line --------------------------------------------------------------------------------
@pytest.mark.parametrize("worker, line", [
    (0, "kerasllm: model written to {out}"),
    (1, "kerasllm: worker 1 done; the chief (worker 0) writes the model to {out}"),
])
def test_only_the_chief_says_it_wrote_the_model(run_cli, corpus_file, tmp_path, monkeypatch, worker, line):
    """Every worker of a multi-worker job had said "model written to OUT"; the others write nothing there."""
    from types import SimpleNamespace

    from kerasllm import distribute
    from kerasllm.recipes import causal_lm

    strategy = object()
    monkeypatch.setattr(causal_lm, "train_causal_lm",
                        lambda *args, **kwargs: SimpleNamespace(model=SimpleNamespace(distribute_strategy=strategy)))
    monkeypatch.setattr(distribute, "worker_info", lambda given: (worker, 2) if given is strategy else None)
    out = tmp_path / "run"
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", out)
    assert result.code == 0 and result.err.splitlines() == [line.format(out=out)], result


def test_a_bad_batch_split_setting_is_one_line(run_cli, corpus_file, tmp_path, monkeypatch):
    """KERASLLM_BATCH_SPLIT (README) set to a word had ended `kerasllm train` in a 48-line traceback."""
    monkeypatch.setenv("KERASLLM_BATCH_SPLIT", "two")
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--steps", "4", *FAST)
    assert result.code == 2 and result.err.splitlines() == [
        "kerasllm: error: KERASLLM_BATCH_SPLIT must be a whole number of parts (1: no split), got 'two'"], result.err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_interval_shorter_than_validation_loses_fewer_steps(run_cli, corpus_file, tmp_path,
                                                                          interrupt_training):
    """Checkpoints had come only with validation (`--eval-interval`): a run stopped 9 steps before
    its next validation lost every step since the last one. With `--checkpoint-interval 5` it keeps
    the checkpoint of step 10 when stopped at 15, resumes from there, and still validates at 20 and 40."""
    out = tmp_path / "run"
    interrupt_training(15)
    args = ["--out", out, "--steps", "40", "--eval-interval", "20", "--checkpoint-interval", "5", "--eval-steps", "1",
            *FAST]
    assert run_cli("train", "causal-lm", "--data", corpus_file, *args).code == 130
    interrupt_training(None)
    # Keras epochs of 5 steps: the second one's checkpoint (step 10) is the last before the stop.
    assert json.loads((out / "checkpoints" / "training_metadata.json").read_text())["epoch"] == 2
    assert run_cli("train", "causal-lm", "--out", out, "--resume").code == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(5, 45, 5))
    assert [r["step"] for r in history if "val_loss" in r] == [20, 40]
    assert (out / "model.keras").is_file() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("checkpoint, evaluation", [("15", "20"), ("30", "20")])
def test_intervals_that_do_not_divide_are_refused(run_cli, corpus_file, tmp_path, checkpoint, evaluation):
    result = run_cli("train", "causal-lm", "--data", corpus_file, "--out", tmp_path / "run", "--steps", "40",
                     "--eval-interval", evaluation, "--checkpoint-interval", checkpoint, *FAST)
    assert result.code == 2 and result.err.splitlines() == [
        f"kerasllm: error: --checkpoint-interval {checkpoint} and --eval-interval {evaluation}: one must be a "
        "multiple of the other (checkpoints and validations fall at the ends of the same Keras epochs)"], result
    assert not (tmp_path / "run").exists()

"""Training runs: callbacks, checkpoints, resume, and the run directory.

A run directory holds everything a finished model needs and nothing half-written:

    DIR/config.json     {"task", "model": family config, "train": the run's arguments, ...}
    DIR/tokenizer.json  the tokenizer the model was trained with
    DIR/model.keras     written once, atomically, when training ends
    DIR/history.jsonl   one JSON object per logged step: step, loss (mean since the line before),
                        val_loss, tokens_per_s
    DIR/checkpoints/    Keras BackupAndRestore state (weights, optimizer, epoch) until model.keras is written
    DIR/.kerasllm.lock  while a run writes DIR: the lock that keeps every other run out (`run_dir_lock`)

`--resume` restores the last checkpoint (weights, optimizer state and step) and
carries on; the same mechanism brings a restarted multi-worker job back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import keras
import numpy as np

from kerasllm.atomic import worker_scratch_dir, write_json_atomic  # noqa: F401 - the recipes' import
from kerasllm import signals
from kerasllm.errors import KerasLLMError, UsageError
# DIR/config.json, read and checked without TensorFlow: the serving side reads it too.
from kerasllm.export.predict import read_run_config  # noqa: F401 - the recipes' import

log = logging.getLogger("kerasllm")

CONFIG_FILE = "config.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".kerasllm.lock"


# -- the run directory ----------------------------------------------------------------------
def prepare_run_dir(out: str | Path, resume: bool, is_chief: bool = True) -> Path:
    """Check that `out` can take a new run (or holds one to resume).

    In multi-worker training only the chief checks and writes `out`; the other workers
    read it (the chief's config, tokenizer and checkpoints) but never write to it.
    """
    out = Path(out)
    if not is_chief and not resume:
        return out
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise UsageError(f"--resume: {out} holds no run to resume (no {CONFIG_FILE})")
        refuse_a_finished_resume(out)
        return out
    # A lock file alone is what a run killed before writing anything left (`run_dir_lock`).
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        raise _not_empty(out)
    return out


def _finished(out: Path) -> bool:
    """Whether `out` holds a run that has finished: its model written, no checkpoint left."""
    return (out / MODEL_FILE).is_file() and not (out / CHECKPOINT_DIR).is_dir()


def refuse_a_finished_resume(out: Path) -> None:
    """`--resume` of a run that has finished is a usage error."""
    if _finished(out):
        raise UsageError(f"--resume: the run in {out} already finished ({MODEL_FILE} is written)")


def _not_empty(out: Path) -> UsageError:
    if (out / CONFIG_FILE).is_file() and _finished(out):
        # (it had suggested --resume, which then said the run had finished)
        return UsageError(f"{out} holds a finished run ({MODEL_FILE} is written); choose a new --out")
    return UsageError(f"{out} exists and is not empty; choose a new --out or pass --resume")


@contextlib.contextmanager
def run_dir_lock(out: Path, resume: bool) -> Iterator[None]:
    """Hold the run directory `out` (which exists) while this run writes it, checked again under
    the lock (`prepare_run_dir`): of two runs started together into one --out exactly one trains,
    and the other gets the refusal it would get later ("exists and is not empty"; with --resume,
    "in use"). Both had passed the check before either wrote anything, then both trained into
    the directory and said "model written", the second one's files in place of the first's.

    The lock is an flock on DIR/.kerasllm.lock, which the kernel drops when the process ends,
    however it ends: the file a killed run leaves behind locks nothing (`prepare_run_dir` takes
    a directory holding nothing else as empty, so the same command, or a restarted multi-worker
    job, starts again). It is removed when the run ends. Where the file system has no locks
    (some network and FUSE mounts), the run goes on unguarded, as before.
    """
    import fcntl  # noqa: PLC0415 - POSIX, as TensorFlow's multi-worker training

    busy = UsageError(f"--resume: {out} is in use by another kerasllm run") if resume else _not_empty(out)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        except OSError:
            pass  # no locks on this file system
        # A run that ends removes the file it locked: a lock on that file, opened before, guards nothing.
        if not _same_file(fd, path):
            raise busy
        try:
            prepare_run_dir(out, resume)  # what another run wrote before this one held the lock
            yield
        finally:
            # Not after this run's failure removed the directory (`run_directory`): another run may hold the new one.
            if _same_file(fd, path):
                path.unlink()
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def save_model_atomic(model: keras.Model, out: Path) -> Path:
    """Write `model.keras` under a temporary name and rename it: never a torn file."""
    final = out / MODEL_FILE
    tmp = out / f".partial.{MODEL_FILE}"
    try:
        model.save(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a torn file left beside the kept checkpoints
        raise
    os.replace(tmp, final)
    return final


# config.json's "task" of each model class: what `kerasllm export`, `evaluate` and the batch commands read.
_TASKS = (("CausalLM", "causal-lm"), ("MaskedLM", "masked-lm"), ("TextClassifier", "classifier"),
          ("TokenClassifier", "token-classifier"), ("Seq2SeqLM", "seq2seq"))


def save_model_dir(out: str | Path, model: keras.Model, tokenizer, *, labels=None, target_tokenizer=None) -> Path:
    """Write a model trained in Python as the model directory `kerasllm train` writes: `model.keras`,
    `tokenizer.json` (a seq2seq model's own target vocabulary: `target_tokenizer.json`) and `config.json`
    (its task, model config and, for a classifier or token classifier, its label names, by default
    "0".."L-1"). `kerasllm export DIR --out BUNDLE`, `kerasllm evaluate` and the batch commands take it.

    Example:
        save_model_dir("runs/my_lm", model, TextTokenizer.train(texts, kind="bpe", vocab_size=4000))
    """
    from kerasllm import models  # noqa: PLC0415
    from kerasllm.tokenizers import TARGET_TOKENIZER_FILE, TOKENIZER_FILE  # noqa: PLC0415

    task = next((task for name, task in _TASKS if isinstance(model, getattr(models, name))), None)
    if task is None:
        raise TypeError(f"save_model_dir: a kerasllm model ({', '.join(n for n, _ in _TASKS)}), got {type(model).__name__}")
    config = model.config
    record = {"task": task, "model": config.to_dict(), "train": {}}
    if task in ("classifier", "token-classifier"):
        labels = [str(label) for label in labels] if labels is not None else [str(i) for i in range(config.num_labels)]
        if len(labels) != config.num_labels or len(set(labels)) != len(labels):
            raise ValueError(f"save_model_dir: {config.num_labels} different label names needed (config.num_labels), "
                             f"got {labels}")
        record["labels"] = labels
    elif labels is not None:
        raise ValueError(f"save_model_dir: labels are a classifier's, not a {type(model).__name__}'s")
    separate = task == "seq2seq" and bool(config.target_vocab_size)
    if separate != (target_tokenizer is not None):
        raise ValueError("save_model_dir: a target_tokenizer is for a Seq2SeqLM with a target vocabulary of its own "
                         f"(config.target_vocab_size), and it needs one{'' if separate else ' only then'}")
    for what, tok, size in (("tokenizer", tokenizer, config.vocab_size),
                            ("target_tokenizer", target_tokenizer, getattr(config, "target_vocab_size", 0))):
        if tok is not None and tok.vocab_size > size:
            raise ValueError(f"save_model_dir: the {what} has {tok.vocab_size} ids, more than the model's "
                             f"vocabulary of {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / TOKENIZER_FILE)
    if target_tokenizer is not None:
        target_tokenizer.save(out / TARGET_TOKENIZER_FILE)
    write_json_atomic(out / CONFIG_FILE, record)
    save_model_atomic(model, out)
    return out


def unfinished_run(out: str | Path) -> bool:
    """`out` holds a run that was stopped after a checkpoint (a restarted job resumes it)."""
    out = Path(out)
    return (out / CONFIG_FILE).is_file() and (out / CHECKPOINT_DIR / "training_metadata.json").is_file()


def worker_backup_dir(out: Path, worker_index: int) -> Path:
    """A non-chief worker's own BackupAndRestore directory, seeded from the chief's backup.

    Keras's `BackupAndRestore` needs a directory per worker (two writers of one file
    tear it). Workers train in lock-step, so the chief's backup is every worker's state:
    each other worker restores from a private copy of it and writes its own backups to
    that scratch directory, which is deleted when training ends (as Keras 2 did), or, where the
    worker was killed, when its next attempt starts (`worker_scratch_dir`).
    """
    scratch = worker_scratch_dir("backup", out, worker_index)
    chief = out / CHECKPOINT_DIR
    if (chief / "training_metadata.json").is_file():
        for name in ("latest.weights.h5", "training_metadata.json", "latest.weights.h5.bkp",
                     "training_metadata.json.bkp"):
            if (chief / name).is_file():
                shutil.copy2(chief / name, scratch / name)
    return scratch


def restored_epoch(out: Path) -> int:
    """The epoch BackupAndRestore will resume from (0 for a fresh run)."""
    meta = out / CHECKPOINT_DIR / "training_metadata.json"
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


# -- callbacks ------------------------------------------------------------------------------
def _finite_loss(logs) -> bool:
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


class StopWhenDiverged(keras.callbacks.Callback):
    """Stop training at the first step whose loss is NaN or infinite (`fit_run` then reports it).

    Keras's `TerminateOnNaN` does the same but also prints "Batch N: Invalid loss, terminating
    training" on stdout, a second line beside kerasllm's one error line.
    """

    def on_train_batch_end(self, batch, logs=None):
        if not _finite_loss(logs):
            self.model.stop_training = True


class StopWhenTerminated(keras.callbacks.Callback):
    """Raise at the next step the stop a signal handler raised (`kerasllm.signals`): Python drops
    a handler's exception raised inside a `__del__` or a garbage-collector callback, and a training
    whose SIGTERM landed there had trained on (a CI run waited 120 s for it)."""

    def _raise_if_received(self, *args, **kwargs):
        signals.raise_if_received()

    on_train_batch_end = on_test_batch_end = on_epoch_end = _raise_if_received


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # a dtype NumPy does not name (bfloat16 without ml_dtypes registered)
        return 2 if "16" in str(dtype) else 4


class RunBackup(keras.callbacks.BackupAndRestore):
    """Keras's `BackupAndRestore` that keeps its checkpoints when training ends and never saves
    a diverged state.

    Keras deletes the backup in `on_train_end` (`delete_checkpoint=True`), inside `fit`, before
    `model.keras` is written: a Ctrl-C or a failure during the final save then left a run with
    nothing to resume from (and `run_directory` removed it). `fit_run` deletes the checkpoints
    once the model is written. An interval whose loss went NaN (the mean over the interval is
    NaN from its first NaN step) would make the checkpoint a NaN model; the previous one stays.
    """

    def __init__(self, backup_dir: Path, every: int = 1):
        # double_checkpoint: the previous backup is kept beside the latest (`.bkp`).
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False, double_checkpoint=True)
        self.every = every  # Keras epochs between checkpoints (`StepPlan.checkpoint_every`)

    def on_epoch_end(self, epoch, logs=None):
        # The last epoch's too: a stop during the final save then resumes straight to the save.
        due = (epoch + 1) % self.every == 0 or epoch + 1 == self.params.get("epochs")
        if due and _finite_loss(logs):
            super().on_epoch_end(epoch, logs)

    def _save_model(self):
        """Keras's save, each file written beside its place and renamed into it: Keras writes
        `latest.weights.h5` in place, and a Ctrl-C or a kill during that write left a valid HDF5
        file holding part of the weights, which every later `--resume` failed to load (a ValueError
        Keras's fallback to `.bkp`, made for OSErrors, did not catch). A kill now leaves the
        previous checkpoint whole; one between the two renames, new weights with the previous
        interval's step (that interval trained again)."""
        backup = Path(self.backup_dir)
        self._check_space(backup)  # before the directory: a run without a checkpoint is then removed
        backup.mkdir(parents=True, exist_ok=True)
        for path in (self._weights_path, self._training_metadata_path):
            if self.double_checkpoint and os.path.exists(path):
                shutil.copyfile(path, f"{path}.partial")
                os.replace(f"{path}.partial", f"{path}.bkp")
        partial = backup / "partial.weights.h5"  # Keras wants the .weights.h5 suffix
        self.model.save_weights(str(partial), overwrite=True)
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        Path(f"{self._training_metadata_path}.partial").write_text(json.dumps(metadata))
        os.replace(partial, self._weights_path)
        os.replace(f"{self._training_metadata_path}.partial", self._training_metadata_path)

    def _check_space(self, backup: Path) -> None:
        """KerasLLMError unless the disk holds a checkpoint's writes: the new weights and the copy of
        the last ones to `.bkp` (weights and optimizer state, ~3x the model in fp32). On a disk that
        filled while h5py wrote, it had printed ~70 tracebacks from its destructors, then the process
        had died of a segmentation fault: at the first checkpoint with the run directory left behind,
        which the same command then refused."""
        state = [*self.model.weights, *getattr(self.model.optimizer, "variables", [])]
        size = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in state)
        # At most one checkpoint's size at a time: the copy of the last one to `.bkp` frees the
        # older `.bkp` it replaces before the new weights are written; twice where there is none yet.
        first_copy = os.path.exists(self._weights_path) and not os.path.exists(f"{self._weights_path}.bkp")
        needed = size * (2 if first_copy else 1) + (1 << 20)
        free = shutil.disk_usage(backup if backup.exists() else backup.parent).free
        if free < needed:
            raise KerasLLMError(f"{backup}: no space left for the checkpoint ({needed / 2**20:,.1f} MiB needed, "
                                f"{free / 2**20:,.1f} MiB free): free space there, then --resume")

    def _load_model(self):
        # A checkpoint torn before the atomic save above (or damaged since) fails to load with a
        # ValueError or KeyError, not the OSError on which Keras falls back to `.bkp`.
        try:
            super()._load_model()
        except (ValueError, KeyError) as err:
            if not self.model.built:
                raise
            raise OSError(f"the checkpoint in {self.backup_dir} cannot be read ({str(err).splitlines()[0]})") from err


class ProgressLogger(keras.callbacks.Callback):
    """A progress bar on stderr (loss, tokens/s) and `history.jsonl`, one line per logged step.

    Steps count across epochs (`epoch * steps_per_epoch + batch + 1`), so a resumed run
    continues the numbering. On resume, lines past the restored step are dropped so the
    history never holds a step twice.

    A line's `loss` is the mean training loss of the steps since the line before (nanoGPT logs
    the step's own loss; a window of `log_every` steps is that, less noisy). Keras's `logs["loss"]`
    is the mean since the Keras epoch (validation interval) began, which lags the model by
    half an interval and drops at every validation; the window's mean is recovered from two
    of those running means (`_window_loss`).
    """

    def __init__(self, history_path: Path, steps_per_epoch: int, total_steps: int, tokens_per_step: int,
                 log_every: int = 10, quiet: bool = False, is_chief: bool = True):
        super().__init__()
        self.history_path = history_path
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.log_every = max(1, log_every)
        self.quiet = quiet
        self.is_chief = is_chief
        self.bar = None
        self.step = 0

    def _write(self, record: dict) -> None:
        if not self.is_chief:
            return
        with open(self.history_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_epoch_begin(self, epoch, logs=None):
        first = epoch * self.steps_per_epoch
        if self.bar is None:
            self._truncate_history(first)
            # A bar on a terminal only: in a log or a pipe its carriage-return frames grow into one
            # endless line; there each interval's line is printed instead (`on_epoch_end`).
            if not self.quiet and self.is_chief and sys.stderr is not None and sys.stderr.isatty():
                from tqdm import tqdm  # noqa: PLC0415

                self.bar = tqdm(total=self.total_steps, initial=first, file=sys.stderr, unit="step",
                                dynamic_ncols=True, desc="train")
        self.step = self.epoch_first = first
        self.mark_time, self.mark_step = time.perf_counter(), first
        self.loss_mark = (0, 0.0)  # (steps into the epoch, Keras's running mean loss there) at the last line

    def _window_loss(self, logs: dict) -> float:
        """Mean loss of the steps since the last logged line, from Keras's running mean over the epoch.

        Keras's loss tracker weights each step by its batch's rows; training batches all have the
        same rows (the pipelines drop a short last batch), so each step weighs the same and
        `mean_n * n - mean_m * m` is the sum of the losses of steps m+1..n.
        """
        running = float(logs.get("loss", math.nan))
        steps, (marked_steps, marked_mean) = self.step - self.epoch_first, self.loss_mark
        self.loss_mark = (steps, running)
        if steps <= marked_steps:
            return running
        return (running * steps - marked_mean * marked_steps) / (steps - marked_steps)

    def _truncate_history(self, first_step: int) -> None:
        if not self.is_chief or not self.history_path.exists():
            return
        kept = [line for line in self.history_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= first_step]
        self.history_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _rate(self) -> float:
        elapsed = time.perf_counter() - self.mark_time
        steps = self.step - self.mark_step
        return steps * self.tokens_per_step / elapsed if elapsed > 0 and steps else 0.0

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last step of the execution within the epoch: with steps_per_execution
        # k, Keras calls this once per k steps (see `execution_steps`).
        done = self.epoch_first + batch + 1
        advanced, self.step = done - self.step, done
        logs = logs or {}
        if self.bar is not None:
            self.bar.update(advanced)
        if self.step >= self.total_steps:  # the last interval may be shorter than the others
            self.model.stop_training = True
        # The last step of an interval (and of the run) is logged with its val_loss in on_epoch_end.
        if self.step % self.log_every == 0 and self.step % self.steps_per_epoch and self.step < self.total_steps:
            rate = self._rate()
            loss = self._window_loss(logs)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            self._write({"step": self.step, "loss": loss, "tokens_per_s": round(rate, 1)})
            self.mark_time, self.mark_step = time.perf_counter(), self.step

    def on_test_begin(self, logs=None):
        self.validation_started = time.perf_counter()

    def on_test_end(self, logs=None):
        # Validation time is not training throughput: move the mark past it.
        self.mark_time += time.perf_counter() - self.validation_started

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        rate = self._rate()
        record = {"step": self.step, "loss": self._window_loss(logs), "tokens_per_s": round(rate, 1)}
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:,.0f}")
        if "val_loss" in logs:
            record["val_loss"] = float(logs["val_loss"])
            if self.bar is not None:
                self.bar.write(f"step {self.step}: loss {record['loss']:.4f}, val_loss {record['val_loss']:.4f}",
                               file=sys.stderr)
        if self.bar is None and not self.quiet and self.is_chief and sys.stderr is not None:
            validated = f", val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            print(f"step {self.step}/{self.total_steps}: loss {record['loss']:.4f}{validated} ({rate:,.0f} tokens/s)",
                  file=sys.stderr, flush=True)
        self._write(record)
        self.mark_time, self.mark_step = time.perf_counter(), self.step

    def on_train_end(self, logs=None):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepPlan(NamedTuple):
    """How a run's steps fall into Keras epochs (`plan_steps`)."""

    total_steps: int
    steps_per_epoch: int  # a Keras epoch: the shorter of the validation and checkpoint intervals
    epochs: int
    validate_every: int  # Keras epochs between validations (and the last epoch)
    checkpoint_every: int  # Keras epochs between checkpoints (and the last epoch)
    one_pass: bool = False  # neither --steps nor --epochs given: one pass over the data, the default


class ValidationEpochs(list):
    """Keras's `validation_freq` as the epochs (1-based) that validate: every `every`-th and the last.
    A list to Keras (it takes an int or a list), but `in` is arithmetic: a list of them all was
    scanned at every epoch, seconds over a run of 100k one-step checkpoint intervals."""

    def __init__(self, every: int, last: int):
        super().__init__()
        self.every, self.last = every, last

    def __contains__(self, epoch) -> bool:
        return epoch % self.every == 0 or epoch == self.last


def plan_steps(steps: int | None, epochs: float | None, steps_per_data_epoch: int, eval_interval: int,
               checkpoint_interval: int | None = None) -> StepPlan:
    """Turn `--steps`/`--epochs`, `--eval-interval` and `--checkpoint-interval` into a `StepPlan`.

    A Keras epoch is the shorter of the two intervals (by default both are `--eval-interval`):
    progress lines, validation and checkpoints happen at the end of epochs, every
    `validate_every` and `checkpoint_every` of them and at the last. So one interval must be a
    multiple of the other. When `total_steps` is not a multiple of the epoch the last one is cut
    short (`ProgressLogger` stops the run at `total_steps`), so `--steps 300 --eval-interval 250`
    trains 300 steps, not 500.
    """
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    one_pass = steps is None and epochs is None
    if steps is None:
        steps = max(1, int(round((epochs or 1) * steps_per_data_epoch)))
    if steps <= 0:
        raise UsageError(f"--steps must be positive, got {steps}")
    checkpoint_interval = checkpoint_interval or eval_interval
    if max(eval_interval, checkpoint_interval) % min(eval_interval, checkpoint_interval):
        raise UsageError(f"--checkpoint-interval {checkpoint_interval} and --eval-interval {eval_interval}: one "
                         "must be a multiple of the other (checkpoints and validations fall at the ends of the "
                         "same Keras epochs)")
    epoch = max(1, min(eval_interval, checkpoint_interval, steps))
    return StepPlan(steps, epoch, -(-steps // epoch), max(1, eval_interval // epoch),
                    max(1, checkpoint_interval // epoch), one_pass)


def execution_steps(log_every: int, steps_per_epoch: int, total_steps: int, eval_steps: int | None) -> int:
    """Train steps per call of the compiled train function (Keras's `steps_per_execution`).

    Between two steps, Keras's `fit` loop runs Python (the epoch iterator, callbacks, the
    function call, reading the logs) while the cores wait: ~2.2 ms per step for the 4-layer
    benchmark model (in one process, alternating 60-step fits: 30.5 -> 28.4 ms/step with the
    split step, 32.2 -> 30.0 without, at 10 steps per call). With k steps per call callbacks
    see every k-th step, so k divides the logging interval, the validation interval, the
    total and the validation steps: every logged, validated and last step is still one a
    callback sees (the largest such k, at most `log_every`).
    """
    return math.gcd(log_every, steps_per_epoch, total_steps, eval_steps or 0)


def check_restored_within(out: Path, plan: StepPlan) -> None:
    """A usage error where a resumed run's checkpoint lies past the steps planned now: a run saved
    before config.json kept its plan (`record_plan`), given --data of another size, had written
    model.keras without training, exit 0. Called by the recipes before they write anything."""
    if restored_epoch(out) > plan.epochs:
        raise UsageError(f"--resume: {out}'s checkpoint is at step {restored_epoch(out) * plan.steps_per_epoch}, "
                         f"past the {plan.total_steps} steps planned now (from --data of another size?); resume it "
                         "with the data it started on")


def record_plan(out: Path, plan: StepPlan) -> None:
    """Save in config.json the steps a run planned at its start (`"plan"`); a `--resume` keeps them
    (`recipes.common.resumed_args`) whatever the size of the data it is given."""
    run = read_run_config(out)
    if "plan" not in run:
        write_json_atomic(out / CONFIG_FILE, {**run, "plan": {"total_steps": plan.total_steps}})


def fit_run(model: keras.Model, train_data, validation_data, out: Path, *, plan: StepPlan,
            tokens_per_step: int, eval_steps: int, quiet: bool = False,
            log_every: int = 10, extra_callbacks=(), worker_index: int = 0, verbose_fit: int = 0):
    """`model.fit` with checkpoints (BackupAndRestore), progress and history, then the final save.

    Only the chief (worker 0) writes into `out`: history, checkpoints and `model.keras`;
    the other workers of a multi-worker run back up to a scratch copy (`worker_backup_dir`).
    """
    is_chief = worker_index == 0
    total_steps, steps_per_epoch, epochs = plan.total_steps, plan.steps_per_epoch, plan.epochs
    if plan.one_pass and is_chief and not quiet and not restored_epoch(out):
        # A run of only --data and --out had ended in seconds, exit 0, with a model that had learned
        # next to nothing (a classifier at 0.80, a seq2seq model's exact match 0.0), and not a word.
        log.info("%d steps: one pass over the data, the default; a model learns little from one pass over a "
                 "small dataset: give --steps or --epochs for a longer run", total_steps)
    if is_chief:
        record_plan(out, plan)
    backup_dir = out / CHECKPOINT_DIR if is_chief else worker_backup_dir(out, worker_index)
    # History before the backup: an interval's checkpoint never lacks its history line when a
    # kill (a multi-worker SIGTERM keeps its default action) lands between the two; a line past
    # the checkpoint is dropped on resume (ProgressLogger._truncate_history).
    callbacks = [
        StopWhenTerminated(),
        ProgressLogger(out / HISTORY_FILE, steps_per_epoch, total_steps, tokens_per_step, log_every=log_every,
                       quiet=quiet, is_chief=is_chief),
        RunBackup(backup_dir, every=plan.checkpoint_every),
        StopWhenDiverged(),
        *extra_callbacks,
    ]
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    steps_per_execution = model.steps_per_execution
    model.steps_per_execution = execution_steps(log_every, steps_per_epoch, total_steps,
                                                eval_steps if validation_data is not None else None)
    if model.distribute_strategy.num_replicas_in_sync > 1:
        # Keras 3's several-step loop fails on more than one replica ("You must feed a value for
        # placeholder tensor", keras-team/keras#19246): multi-worker and multi-GPU runs had ended
        # in that traceback under the default options.
        model.steps_per_execution = 1
    model.train_function = model.test_function = None  # built again with these steps per call
    try:
        history = model.fit(
            train_data, epochs=epochs, steps_per_epoch=steps_per_epoch,
            validation_data=validation_data, validation_steps=eval_steps if validation_data is not None else None,
            validation_freq=ValidationEpochs(plan.validate_every, epochs),
            callbacks=callbacks, verbose=verbose_fit,
        )
        losses = history.history.get("loss", [])
        if losses and not math.isfinite(losses[-1]):
            if is_chief and unfinished_run(out):  # a checkpoint from before the NaN interval (RunBackup)
                raise KerasLLMError(f"training diverged: loss is {losses[-1]} ; {out} keeps its last checkpoint "
                                    "from before; train again with a lower --lr and a new --out")
            raise KerasLLMError(f"training diverged: loss is {losses[-1]} ; try a lower --lr")
        # Every worker saves: under MultiWorkerMirroredStrategy saving runs collective ops
        # that all workers must join; the others write to their scratch directory.
        if not is_chief:
            backup_dir.mkdir(parents=True, exist_ok=True)
        save_model_atomic(model, out if is_chief else backup_dir)
    finally:
        model.steps_per_execution = steps_per_execution
        model.train_function = model.test_function = None
        if not is_chief:
            shutil.rmtree(backup_dir, ignore_errors=True)
    if is_chief:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return history

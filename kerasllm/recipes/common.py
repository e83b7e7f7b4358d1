"""What every `kerasllm train ...` run takes: the shared arguments, declared once."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from kerasllm.config import read_config_json
from kerasllm.errors import UsageError
from kerasllm.recipes import WEIGHT_DECAY
from kerasllm.training import (CHECKPOINT_DIR, CONFIG_FILE, MODEL_FILE, prepare_run_dir, read_run_config,
                               run_dir_lock, write_json_atomic)

# The arguments that name input files, and the option that gives each again beside `--resume`.
DATA_PATHS = {"data": "--data", "source_file": "--source-file", "target_file": "--target-file"}


@dataclass
class RunArgs:
    """Arguments shared by every training recipe; saved in config.json so `--resume` repeats them.

    Each recipe's dataclass adds its own fields (data, fields, task options) and may
    re-declare a default here (e.g. a larger `batch_size`).
    """

    preset: str = "tiny"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int | None = None
    weight_decay: float = WEIGHT_DECAY
    label_smoothing: float = 0.0
    tokenizer: str = "char"
    vocab_size: int = 4000
    eval_interval: int = 100
    checkpoint_interval: int | None = None  # None: every eval_interval (runs saved before it)
    eval_steps: int = 20
    validation_fraction: float = 0.1
    seed: int = 0
    jit_compile: bool = True
    log_every: int = 10


def train_record(args) -> dict:
    """What config.json records of a run's arguments (`"train"`): every field, with the paths
    (data files, `--init-from`) absolute. As typed they were relative to the directory the run
    started in, and `--resume` from another directory could not find them."""
    record = asdict(args)
    for name in (*DATA_PATHS, "init_from"):
        value = record.get(name)
        if isinstance(value, list):
            record[name] = [os.path.abspath(path) for path in value]
        elif value:
            record[name] = os.path.abspath(value)
    return record


def resumed_args(args_class, task: str, run: dict, out: Path, **paths):
    """The arguments of a resumed run: those saved in its config.json (`run`), with the data paths
    given again (`paths`: the recipe's fields among DATA_PATHS, empty when not given) in place of
    all the saved ones. A saved path that is gone is a usage error that says where it was saved
    and how to give another (it had read "reviews.tsv: no such file" from another directory).

    `task`: the recipe's; a run of another task is one usage line (`train classifier --resume` of a
    stopped masked-lm run had ended in a TypeError or KeyError traceback). An `--epochs` run keeps the
    steps it planned at its start (`training.record_plan`): planned again from --data of another size, its
    checkpoint's epochs had fallen on other steps, or past the new end."""
    if run.get("task") != task:
        raise UsageError(f"--resume: {out} holds a {run.get('task')} run, not a {task} one; resume it with "
                         f"'kerasllm train {run.get('task')} --out {out} --resume'")
    config_file = Path(out) / CONFIG_FILE
    # Settings this version does not know: a run written by a newer kerasllm (resumed after a rollback, or
    # a colleague's) had ended in a TypeError traceback for the train section and an unnamed file for the model.
    unknown = sorted(set(run["train"]) - {f.name for f in dataclasses.fields(args_class)})
    if unknown:
        raise UsageError(f"--resume: {config_file} holds training settings this kerasllm does not know "
                         f"({', '.join(unknown)}): the run was started by another (newer) version; resume it with "
                         "that version")
    saved = dict(run["train"])
    if saved.get("epochs") is not None and run.get("plan"):
        saved.update(steps=int(run["plan"]["total_steps"]), epochs=None)
    if any(paths.values()):
        return args_class(**{**saved, **paths})
    for name in paths:
        value = saved.get(name)
        for path in value if isinstance(value, list) else [value]:
            if path and not Path(path).exists():
                again = " and ".join(DATA_PATHS[n] for n in paths if saved.get(n))
                raise UsageError(f"{path} (the {DATA_PATHS[name]} saved in {Path(out) / CONFIG_FILE}): no such file "
                                 f"or directory; pass {again} again to read the data from elsewhere")
    return args_class(**saved)


def resumed_model_config(config_class, run: dict, out: Path):
    """The model config of a resumed run (`run`: its config.json); a key this version does not know (a
    run a newer kerasllm started) is one line naming the file, which `from_dict`'s own message did not."""
    try:
        return config_class.from_dict(run["model"])
    except UsageError as err:
        raise UsageError(f"--resume: {Path(out) / CONFIG_FILE}: model {err} (a run started by another kerasllm "
                         "version?)") from None


# What a run holds once it has something to resume or keep: a failed run that holds either is never
# removed. Not its history alone: a run that failed (or diverged) before its first checkpoint has
# nothing to resume from, and keeping it would refuse the same command run again ("exists").
PROGRESS = (CHECKPOINT_DIR, MODEL_FILE)


def record_data_paths(out: Path, args) -> None:
    """Save in config.json the data paths a resumed run reads (`args`, from `resumed_args`): those
    given again had been used but not saved, so a second interruption needed them again."""
    run = read_run_config(out)
    record = train_record(args)
    paths = {name: record[name] for name in DATA_PATHS if name in record}
    if any(run["train"].get(name) != path for name, path in paths.items()):
        write_json_atomic(out / CONFIG_FILE, {**run, "train": {**run["train"], **paths}})


@contextlib.contextmanager
def run_directory(out: str | Path, *, resume: bool, is_chief: bool) -> Iterator[Path]:
    """The run directory `out` around the whole of a recipe's run: checked (`prepare_run_dir`), and by
    the chief (the one writer in a multi-worker job) created and held (`run_dir_lock`) from that check
    on, before the data is read and tokenized, so that of two runs started together into one --out the
    second is refused at once. The directory had been created only once the data was tokenized, and
    both runs had trained into it. On a failure a fresh run's directory is removed again if this run
    created it and it holds no progress yet (`PROGRESS`: it failed before its first checkpoint), so a
    failed run leaves nothing half-written behind and a stopped one keeps what it can resume from (a
    Ctrl-C during the final save had removed it all). What the run writes first: `write_run_files`."""
    out = prepare_run_dir(out, resume, is_chief=is_chief)
    if not is_chief:
        yield out
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(out, resume):
        try:
            yield out
        except BaseException:
            # Under the lock: no other run has taken the directory in the meantime.
            if created and not any((out / name).exists() for name in PROGRESS):
                shutil.rmtree(out, ignore_errors=True)
            raise


def write_run_files(out: Path, *, resume: bool, dist, args, task: str, config, tokenizers, **extra) -> None:
    """What the chief writes into the run directory before training. A fresh run: each tokenizer at
    its path (`tokenizers`: (tokenizer, path) pairs) and config.json (the task, the model config,
    `extra` such as the labels, the training arguments and `distribute_record`); a resumed one: its
    data paths (`args`), recorded in its config.json (`record_data_paths`)."""
    if not dist.is_chief:
        return
    if resume:
        record_data_paths(out, args)
        return
    for tokenizer, path in tokenizers:
        tokenizer.save(path)
    write_json_atomic(out / CONFIG_FILE, {"task": task, "model": config.to_dict(), **extra,
                                          "train": train_record(args), **distribute_record(dist)})


def distribute_record(dist) -> dict:
    """What config.json records of the run's `--strategy/--tpu/--precision/--scale-lr`: `--resume`
    takes the saved precision (its checkpoint's optimizer state is that precision's)."""
    return {"distribute": asdict(dist.options)} if dist.options is not None else {}


def model_config(config_class, preset: str, config_file: str | None, overrides: dict, **changes):
    """The model config of a fresh run, for every family: the `--preset`'s shape, the keys of a
    `--config` file on top (a partial file means "this preset, with these changes"; a full one
    sets every field), then the command line's overrides and the recipe's `changes` (the
    tokenizer's ids, the number of labels)."""
    values = read_config_json(config_file) if config_file else {}
    # One config built from it all, checked once: from_dict names a wrong family or unknown key
    # (the file's), validate a bad value or combination (a UsageError each).
    return config_class.from_dict({**config_class.preset(preset).to_dict(), **values, **overrides, **changes})


# More unknown tokens than this share of the training tokens is said in a warning line.
UNKNOWN_SHARE_NOTED = 0.01
# A token cache past this many tokens is sampled (a 100M-token cache read whole took 95 MB and 0.4 s).
UNKNOWN_SAMPLE_TOKENS = 1 << 24


def warn_unknown_tokens(tokenizer, sequences, *, origin: str, texts=None, what: str = "training") -> float:
    """Warn (one line) when more than 1% of the tokens of `sequences` (lists or an array of ids) are the
    tokenizer's unknown token; the share. A tokenizer made for other text (`--init-from` a model
    pretrained on another corpus, a `--resume` given new --data) had turned every digit of a NER set into
    `<unk>` without a word: 12% of the tokens, entity F1 0.57 against 0.71 from scratch. `origin` says
    where the tokenizer came from; `texts` (the data's texts) lets a character tokenizer name the
    characters it lacks."""
    import numpy as np  # noqa: PLC0415

    unk = tokenizer.unk_id
    if isinstance(sequences, np.ndarray):  # a corpus's token cache (a memory map): blocks spread over it
        sequences = sequences.reshape(-1)
        if sequences.size > UNKNOWN_SAMPLE_TOKENS:  # a share, not a count: 64 blocks give it, in bounded memory
            block = UNKNOWN_SAMPLE_TOKENS // 64
            starts = np.linspace(0, sequences.size - block, 64).astype(np.int64)
            sequences = np.concatenate([sequences[start:start + block] for start in starts])
        total, count = sequences.size, int(np.count_nonzero(sequences == unk))
    else:
        total, count = sum(map(len, sequences)), sum(list(seq).count(unk) for seq in sequences)
    share = count / total if total else 0.0
    if share > UNKNOWN_SHARE_NOTED:
        missing = tokenizer.unknown_chars(texts) if texts is not None else []
        named = ", ".join(map(repr, missing[:8])) + (", ..." if len(missing) > 8 else "")
        lacks = f"; it lacks {named}" if missing else ""
        logging.getLogger("kerasllm").warning(
            "warning: %.1f%% of the %s tokens (%s of %s) are <unk>: the tokenizer (%s) does not cover this "
            "data%s", 100 * share, what, f"{count:,}", f"{total:,}", origin, lacks)
    return share


def tokenizer_origin(out: Path, resume: bool, init_from: str | None = None) -> str:
    """Where a run's tokenizer came from, for `warn_unknown_tokens`."""
    if resume:
        return f"the run's own, in {out}"
    if init_from:
        return f"--init-from {init_from}'s"
    return "trained on it"


def check_seq_len(seq_len: int, config) -> None:
    """Refuse a `--seq-len` longer than the model's positions (exit 2 through the CLI)."""
    if seq_len > config.max_length:
        raise UsageError(f"--seq-len {seq_len} is larger than the model's max_length {config.max_length}")


def pretrained_run(init_from: str, tasks: tuple[str, ...]):
    """`(run config, tokenizer)` of the model directory a fine-tuning run starts from (`--init-from`),
    which must be a finished run of one of `tasks` (exit 2 otherwise)."""
    from kerasllm.modeldir import is_model_dir  # noqa: PLC0415
    from kerasllm.tokenizers import TextTokenizer  # noqa: PLC0415

    if not is_model_dir(init_from):
        raise UsageError(f"--init-from {init_from}: not a finished model directory (model.keras + config.json)")
    run = read_run_config(init_from)
    if run.get("task") not in tasks:
        raise UsageError(f"--init-from {init_from}: a {run.get('task')!r} model; expected one of {', '.join(tasks)}")
    return run, TextTokenizer.load(init_from)


def fine_tuning_changes(changes: dict, config_file: str | None, overrides: dict | None) -> dict:
    """The config changes a fine-tune (`--init-from`) makes to the pretrained model's: `changes` (the
    recipe's, e.g. pooling) and the overrides that leave its weights as they are (dropout); a
    `--config` or an override of its shape is a UsageError naming them."""
    overrides = dict(overrides or {})
    changes = {**changes, **{name: overrides.pop(name) for name in ("dropout",) if name in overrides}}
    refused = (["--config"] if config_file else []) + sorted(overrides)
    if refused:
        raise UsageError(f"--init-from takes the pretrained model's architecture; drop {', '.join(refused)}")
    return changes


def copy_pretrained_encoder(model, init_from: str) -> None:
    """Set `model`'s encoder weights to those of the model directory `init_from` (Keras side)."""
    from kerasllm.modeldir import load_model_dir  # noqa: PLC0415 - imports TensorFlow

    pretrained_model, _, _ = load_model_dir(init_from)
    model.encoder.set_weights(pretrained_model.encoder.get_weights())


def labelled_datasets(dist, make_dataset: Callable, train: tuple, val: tuple, batch_size: int, pad_id: int,
                      seq_len: int, seed: int):
    """`(training batches, validation batches or None)` of a labelled encoder task (classifier, token
    classifier): `make_dataset(sequences, labels, batch, pad_id, seq_len, shuffle=, seed=)` (from
    `kerasllm.data_tasks`) over `train` and `val` (each `(sequences, labels)`), distributed by `dist`;
    each worker of a multi-worker job keeps its own share of the batches (`shard_batches`)."""
    from kerasllm.distribute import shard_batches  # noqa: PLC0415

    def batches(data: tuple, shuffle: bool) -> Callable:
        return lambda batch, shard, shards: shard_batches(
            make_dataset(*data, batch, pad_id, seq_len, shuffle=shuffle, seed=seed), shard, shards)

    return (dist.distribute(batches(train, True), batch_size),
            dist.distribute(batches(val, False), batch_size) if len(val[0]) else None)

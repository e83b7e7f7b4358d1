"""Options shared by the `kerasllm train` sub-commands, declared once."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path

import click
from click.core import ParameterSource

from kerasllm.recipes import WEIGHT_DECAY  # TensorFlow-free, as this module


DISTRIBUTE_OPTIONS = ("strategy", "tpu", "precision", "scale_lr")


@contextlib.contextmanager
def quiet_logging(quiet: bool):
    """The "kerasllm" logger at WARNING while a `--quiet` serving command runs (its info lines unsaid:
    "ONNX Runtime ... on CPUExecutionProvider", which a quiet job that succeeds had printed every
    run, and cron mails any stderr), as it was after."""
    logger = logging.getLogger("kerasllm")
    level = logger.level
    if quiet:
        logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


class FiniteFloatRange(click.FloatRange):
    """`click.FloatRange` that also refuses nan and inf: `nan` passes every range comparison
    (`--lr nan` trained until the loss was nan), `--epochs inf` overflowed planning the steps."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


def distribute_options(command):
    """--strategy/--tpu/--precision/--scale-lr -> one `distribute=DistributeArgs(...)` argument."""
    import inspect  # noqa: PLC0415

    accepts = "distribute" in inspect.signature(command).parameters

    @click.option("--strategy", type=click.Choice(["auto", "one-device", "mirrored", "multi-worker", "tpu",
                                                   "parameter-server"]), default="auto", show_default=True,
                  help="tf.distribute strategy: auto = all local GPUs if more than one; multi-worker reads "
                       "TF_CONFIG or the Slurm job.")
    @click.option("--tpu", help="TPU name or grpc:// address for --strategy tpu (default: a local TPU VM).")
    @click.option("--precision", type=click.Choice(["fp32", "mixed_float16", "mixed_bfloat16"]), default="fp32",
                  show_default=True, help="Compute precision; float32 variables, loss scaling for float16.")
    @click.option("--scale-lr", is_flag=True,
                  help="Multiply --lr by the number of replicas (linear scaling rule).")
    @functools.wraps(command)
    def wrapper(**kwargs):
        from kerasllm.distribute import DistributeArgs  # noqa: PLC0415 - TF-free

        values = {k: kwargs.pop(k) for k in DISTRIBUTE_OPTIONS}
        if values["tpu"] and values["strategy"] != "tpu":  # refused rather than ignored
            raise click.UsageError("--tpu names the TPU of --strategy tpu; add --strategy tpu or drop --tpu")
        if kwargs.get("resume"):
            values["precision"] = _resumed_precision(kwargs["out"], values["precision"])
        distribute = DistributeArgs(**values)
        if accepts:
            return command(distribute=distribute, **kwargs)
        if distribute != DistributeArgs():
            raise click.UsageError("--strategy/--tpu/--precision/--scale-lr are not supported by this command yet")
        return command(**kwargs)

    return wrapper


def _resumed_precision(out: Path, given: str) -> str:
    """The `--precision` of a resumed run: the one it trained with (config.json's "distribute"),
    whose optimizer state its checkpoint holds. Another was taken as given, and Keras then dropped
    that state with a warning (AdamW's moments and step: the schedule started over, in fp32)."""
    import json  # noqa: PLC0415

    from kerasllm.errors import UsageError  # noqa: PLC0415

    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8")).get("distribute", {}).get("precision")
    except (OSError, ValueError, AttributeError):
        return given  # the recipe reports a missing or broken run directory
    if saved is None:  # a run recorded before its precision was
        return given
    source = click.get_current_context().get_parameter_source("precision")
    if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT) and given != saved:
        raise UsageError(f"--resume continues the run in {out}, trained with --precision {saved}: its "
                         f"checkpoint holds that precision's optimizer state; drop --precision {given}")
    return saved


# Every train command's --vocab-size (the tokenizer checks what each kind needs: TextTokenizer.train).
vocab_size_option = click.option("--vocab-size", type=click.IntRange(min=1), default=4000, show_default=True,
                                 help="Subword vocabulary size (bpe, unigram).")


def run_options(batch_size: int, seq_len: int | None, lr: float, weight_decay: float = WEIGHT_DECAY):
    """--out, --preset, --config, --steps/--epochs, optimisation, validation, --resume, --quiet,
    and the distribution options (`distribute_options`). `seq_len` None: the model's max_length
    (seq2seq, where --max-length alone sets both). The defaults given are the task recipe's own
    (its arguments dataclass), for a CLI run to train as a Python one does."""

    def decorate(command):
        command = distribute_options(command)
        options = [
            click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                         help="Run directory to write (model.keras, tokenizer.json, config.json, history.jsonl)."),
            click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default="tiny", show_default=True,
                         help="Model size preset."),
            click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                         help="Model config JSON: its keys replace --preset's (the model options below replace both)."),
            click.option("--steps", type=click.IntRange(min=1), help="Training steps (default: one epoch of data)."),
            click.option("--epochs", type=FiniteFloatRange(min=0, min_open=True),
                         help="Passes over the data, instead of --steps."),
            click.option("--batch-size", type=click.IntRange(min=1), default=batch_size, show_default=True,
                         help="Global batch size (split across replicas)."),
            click.option("--seq-len", type=click.IntRange(min=1), default=seq_len, show_default=seq_len is not None,
                         help="Tokens per training sequence." if seq_len is not None else
                         "Longest source or target, in tokens (default: the model's max_length)."),
            click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=lr, show_default=True,
                         help="Peak learning rate (AdamW, warmup then cosine decay to lr/10)."),
            click.option("--warmup-steps", type=click.IntRange(min=0), help="Linear warmup steps (default 5% of steps)."),
            click.option("--weight-decay", type=FiniteFloatRange(min=0), default=weight_decay, show_default=True,
                         help="Decoupled weight decay on weight matrices."),
            click.option("--label-smoothing", type=FiniteFloatRange(0, 1, max_open=True), default=0.0,
                         show_default=True, help="Label smoothing of the cross-entropy."),
            click.option("--eval-interval", type=click.IntRange(min=1), default=100, show_default=True,
                         help="Validate (and, by default, checkpoint) every N steps."),
            click.option("--checkpoint-interval", type=click.IntRange(min=1),
                         help="Checkpoint every N steps (default: --eval-interval), a divisor or a multiple of "
                              "--eval-interval: a stopped run resumes from its last checkpoint, so a shorter "
                              "interval loses fewer steps to a stop, for the time each checkpoint takes to write."),
            click.option("--eval-steps", type=click.IntRange(min=1), default=20, show_default=True,
                         help="Validation batches per evaluation."),
            click.option("--validation-fraction", type=FiniteFloatRange(0, 1, max_open=True), default=0.1,
                         show_default=True, help="Fraction of the data held out for validation."),
            # NumPy's and Keras's seeds are 32-bit: a negative or larger one failed deep in training.
            click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
                         help="Random seed (0 to 2**32 - 1)."),
            click.option("--jit-compile/--no-jit-compile", default=True, show_default=True,
                         help="Compile the train step with XLA: ~1.7x faster steps on one device, a slower "
                              "first step; turned off with several replicas (XLA cannot compile them)."),
            click.option("--resume", is_flag=True,
                         help="Continue the stopped run in --out from its last checkpoint, with the options saved "
                              "in its config.json (its --precision too): beside it only the data paths (files "
                              "moved), --quiet and --strategy/--tpu/--scale-lr are taken; other options are "
                              "refused."),
            click.option("--quiet", is_flag=True, help="No progress bar."),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def model_override_options(command):
    """--layers/--heads/--hidden/--intermediate/--max-length/--dropout/--position/--activation -> `overrides`."""
    names = {"layers": "num_layers", "heads": "num_heads", "hidden": "hidden_dim",
             "intermediate": "intermediate_dim", "max_length": "max_length", "dropout": "dropout",
             "position": "position", "activation": "activation"}

    @click.option("--layers", type=click.IntRange(min=1), help="Override the preset's number of blocks.")
    @click.option("--heads", type=click.IntRange(min=1), help="Override the number of attention heads.")
    @click.option("--hidden", type=click.IntRange(min=1), help="Override the hidden size.")
    @click.option("--intermediate", type=click.IntRange(min=1), help="Override the feed-forward size.")
    @click.option("--max-length", type=click.IntRange(min=1), help="Override the maximum sequence length.")
    @click.option("--dropout", type=FiniteFloatRange(0, 1, max_open=True), help="Override the dropout rate.")
    @click.option("--position", type=click.Choice(["learned", "sinusoidal", "rotary"]), help="Position encoding.")
    @click.option("--activation", type=click.Choice(["gelu", "relu", "swiglu"]), help="Feed-forward activation.")
    @functools.wraps(command)
    def wrapper(**kwargs):
        overrides = {names[k]: kwargs.pop(k) for k in list(names) if kwargs.get(k) is not None}
        for k in names:
            kwargs.pop(k, None)
        return command(overrides=overrides, **kwargs)

    return wrapper

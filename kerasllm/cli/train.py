"""`kerasllm train ...`: one sub-command per task, sharing the run conventions.

Every task writes a run directory (model.keras, tokenizer.json, config.json,
history.jsonl), shows a progress bar with loss and tokens/s, validates at intervals,
checkpoints at each validation (or every `--checkpoint-interval` steps), and continues a stopped run
with `--resume`.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from kerasllm.cli.options import DISTRIBUTE_OPTIONS, model_override_options, run_options, vocab_size_option
from kerasllm.recipes import ENCODER_WEIGHT_DECAY


@click.group()
def train():
    """Train a model: causal-lm (GPT-like), masked-lm, classifier and token-classifier (BERT-like),
    seq2seq (encoder-decoder).

    \b
    Example:
      kerasllm train causal-lm --data corpus.txt --out runs/lm --steps 500
    """


@train.command("causal-lm")
@click.option("--data", "data", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Text file or directory of .txt files (repeatable). Optional with --resume.")
@click.option("--tokenizer", type=click.Choice(["char", "byte", "bpe", "unigram"]), default="char",
              show_default=True, help="Tokenizer trained on the data.")
@vocab_size_option
@click.option("--window", type=click.Choice(["random", "packed"]), default="random", show_default=True,
              help="Random windows (nanoGPT) or packed consecutive windows.")
@run_options(batch_size=12, seq_len=64, lr=1e-3)
@model_override_options
def causal_lm(data, out, preset, config_file, steps, epochs, batch_size, seq_len, lr, warmup_steps, weight_decay,
              label_smoothing, tokenizer, vocab_size, window, eval_interval,
              checkpoint_interval, eval_steps, validation_fraction, seed,
              jit_compile, resume, quiet, overrides, distribute):
    """Pretrain a GPT-like causal language model on plain text.

    \b
    Example:
      kerasllm train causal-lm --data corpus.txt --out runs/lm --preset small --steps 2000
      kerasllm train causal-lm --out runs/lm --resume      # continue a stopped run
    """
    _refuse_with_resume(resume, out)
    from kerasllm.recipes.causal_lm import CausalLMTrainArgs, train_causal_lm  # noqa: PLC0415

    if not data and not resume:
        raise click.UsageError("--data is required (except with --resume)")
    args = CausalLMTrainArgs(
        data=[str(p) for p in data], preset=preset, steps=steps, epochs=epochs, batch_size=batch_size,
        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
        label_smoothing=label_smoothing, tokenizer=tokenizer, vocab_size=vocab_size, eval_interval=eval_interval,
        checkpoint_interval=checkpoint_interval,
        eval_steps=eval_steps, validation_fraction=validation_fraction, window=window, seed=seed,
        jit_compile=jit_compile,
    )
    with _sigterm_unwinds(distribute):
        history = train_causal_lm(args, out, config_file=config_file, resume=resume, quiet=quiet,
                                  config_overrides=overrides, distribute=distribute)
    _say_where_the_model_is(out, history)


@train.command("seq2seq")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pairs in a TSV/CSV (header row) or JSONL file; see --source-field/--target-field.")
@click.option("--source-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Source side as a text file, one sentence per line (with --target-file).")
@click.option("--target-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Target side, line-aligned with --source-file.")
@click.option("--source-field", default="source", show_default=True, help="Source column/field in --data.")
@click.option("--target-field", default="target", show_default=True, help="Target column/field in --data.")
@click.option("--tokenizer", type=click.Choice(["char", "byte", "bpe", "unigram"]), default="char",
              show_default=True, help="Tokenizer trained on the data.")
@vocab_size_option
@click.option("--separate-vocab", is_flag=True,
              help="Separate source and target tokenizers (tokenizer.json, target_tokenizer.json).")
@click.option("--target-tokenizer", type=click.Choice(["char", "byte", "bpe", "unigram"]),
              help="Kind of the target tokenizer with --separate-vocab (default: --tokenizer).")
@run_options(batch_size=32, seq_len=None, lr=1e-3)
@model_override_options
def seq2seq(data, source_file, target_file, source_field, target_field, tokenizer, vocab_size, separate_vocab,
            target_tokenizer, out,
            preset, config_file, steps, epochs, batch_size, seq_len, lr, warmup_steps, weight_decay, label_smoothing,
            eval_interval, checkpoint_interval, eval_steps, validation_fraction, seed, jit_compile, resume, quiet,
            overrides, distribute):
    """Train an encoder-decoder (Transformer/T5-like) on source/target pairs.

    --seq-len is the longest source or target (in tokens) accepted, at most the model's
    max_length (its default); a longer pair is an error naming its line.

    \b
    Example:
      kerasllm sample-data numbers --out pairs.tsv
      kerasllm train seq2seq --data pairs.tsv --out runs/numbers --steps 600 --tokenizer bpe --vocab-size 300 \\
          --separate-vocab --target-tokenizer char
      kerasllm train seq2seq --source-file train.en --target-file train.de --out runs/mt --separate-vocab
    """
    _refuse_with_resume(resume, out)
    from kerasllm.recipes.seq2seq import Seq2SeqTrainArgs, train_seq2seq  # noqa: PLC0415

    if data and (source_file or target_file):
        raise click.UsageError("give --data or --source-file/--target-file, not both")
    if bool(source_file) != bool(target_file):
        raise click.UsageError("--source-file and --target-file go together")
    if not (data or source_file or resume):
        raise click.UsageError("--data or --source-file/--target-file is required (except with --resume)")
    args = Seq2SeqTrainArgs(
        data=str(data) if data else None, source_file=str(source_file) if source_file else None,
        target_file=str(target_file) if target_file else None, source_field=source_field, target_field=target_field,
        preset=preset, steps=steps, epochs=epochs, batch_size=batch_size, seq_len=seq_len, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, label_smoothing=label_smoothing, tokenizer=tokenizer,
        vocab_size=vocab_size, separate_vocab=separate_vocab, target_tokenizer=target_tokenizer,
        eval_interval=eval_interval, checkpoint_interval=checkpoint_interval, eval_steps=eval_steps,
        validation_fraction=validation_fraction, seed=seed,
        jit_compile=jit_compile,
    )
    with _sigterm_unwinds(distribute):
        history = train_seq2seq(args, out, config_file=config_file, resume=resume, quiet=quiet,
                                config_overrides=overrides, distribute=distribute)
    _say_where_the_model_is(out, history)


def _sigterm_unwinds(distribute):
    """SIGTERM (a job manager, `timeout`, `kill`) and SIGHUP (a closed terminal) stop a one-process
    training as Ctrl-C does (`kerasllm.signals`): the run directory is left as after an interrupt
    (a run stopped before its first checkpoint is removed, one after it keeps what --resume needs)
    and the command ends in one line, exit 143 (129). Under the default action the process had died
    where it stood, and a run stopped in its first interval left a directory that the same command
    then refused ("exists and is not empty").

    Not for `--strategy multi-worker`: a worker blocked in a collective op runs no Python, so a
    Python handler would leave it running; there the signals keep their default action (distribute.py)."""
    from kerasllm.signals import stops_cleanly  # noqa: PLC0415

    return stops_cleanly(enabled=distribute is None or distribute.strategy != "multi-worker")


def _say_where_the_model_is(out: Path, history) -> None:
    """The closing line of a run. In a multi-worker job only the chief (worker 0) writes `out`; the
    other workers had said "model written to OUT" too, though they wrote nothing there."""
    from kerasllm.distribute import worker_info  # noqa: PLC0415 - imports TensorFlow

    worker, _ = worker_info(history.model.distribute_strategy)
    if worker == 0:
        click.echo(f"kerasllm: model written to {out}", err=True)
    else:
        click.echo(f"kerasllm: worker {worker} done; the chief (worker 0) writes the model to {out}", err=True)


_text_fields = [
    click.option("--data", "data", multiple=True, type=click.Path(exists=True, path_type=Path),
                 help="TSV/CSV (header row), JSONL or text file, or a directory of .txt files (repeatable). "
                      "Optional with --resume."),
    click.option("--text-field", default="text", show_default=True, help="Field (column) holding the text."),
]


# What `--resume` takes beside it: where the run is, its data files (moved or renamed), whether to
# show progress, and where to run it (the strategy; a --precision must be the saved one, whose
# optimizer state the checkpoint holds: options._resumed_precision).
RESUME_TAKES = ("out", "data", "source_file", "target_file", "resume", "quiet", *DISTRIBUTE_OPTIONS)


def _refuse_given(reason: str, names) -> None:
    """A usage error naming the options among `names` given on the command line (or in the
    environment), as the user wrote them: `reason` says why they cannot be taken."""
    ctx = click.get_current_context()
    params = {param.name: param for param in ctx.command.params}
    given = []
    for name in names:
        if ctx.get_parameter_source(name) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        param = params[name]
        # --no-jit-compile, not --jit-compile, when that is what was given
        off = getattr(param, "secondary_opts", None) and ctx.params.get(name) is False
        given.append(param.secondary_opts[0] if off else param.opts[0])
    if given:
        raise click.UsageError(f"{reason}; drop {', '.join(given)}")


# The options that set a model's shape (`model_override_options`, --preset, --config): a pretrained
# run brings its own. --dropout is a fine-tuning setting, taken with --init-from.
ARCHITECTURE_OPTIONS = ("preset", "config_file", "layers", "heads", "hidden", "intermediate", "max_length",
                        "position", "activation")


def _refuse_with_init_from(init_from) -> None:
    """A usage error naming the options given on the command line that `--init-from` would ignore:
    the pretrained run brings its own tokenizer and architecture (it had said "drop --config and
    overrides" of `--layers 4`)."""
    if init_from:
        _refuse_given("--init-from takes the pretrained model's tokenizer and architecture",
                      [*ARCHITECTURE_OPTIONS, "tokenizer", "vocab_size"])


def _refuse_with_resume(resume: bool, out: Path) -> None:
    """A usage error for options given beside `--resume`, before anything is read: a resumed run
    repeats the stopped one with its saved options (a restarted multi-worker job, which resumes
    without `--resume`, is not concerned: it gives the very same command again)."""
    if resume:
        from kerasllm.training import refuse_a_finished_resume  # noqa: PLC0415 - imports Keras

        refuse_a_finished_resume(Path(out))  # first: it had said "drop --steps", then that the run had finished
        ctx = click.get_current_context()
        _refuse_given(f"--resume continues the run in {out} with its saved options",
                      [param.name for param in ctx.command.params if param.name not in RESUME_TAKES])


def _with(options):
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@train.command("masked-lm")
@_with(_text_fields)
@click.option("--tokenizer", type=click.Choice(["char", "byte", "bpe", "unigram"]), default="char",
              show_default=True, help="Tokenizer trained on the data.")
@vocab_size_option
@run_options(batch_size=32, seq_len=128, lr=1e-3, weight_decay=ENCODER_WEIGHT_DECAY)
@model_override_options
def masked_lm(data, text_field, out, preset, config_file, steps, epochs, batch_size, seq_len, lr, warmup_steps,
              weight_decay, label_smoothing, tokenizer, vocab_size, eval_interval,
              checkpoint_interval, eval_steps, validation_fraction,
              seed, jit_compile, resume, quiet, overrides, distribute):
    """Pretrain a BERT-like encoder by masked-token prediction (15% masked, 80/10/10).

    \b
    Example:
      kerasllm train masked-lm --data reviews.jsonl --out runs/mlm --steps 1000
      kerasllm train classifier --data reviews.jsonl --init-from runs/mlm --out runs/clf
    """
    _refuse_with_resume(resume, out)
    from kerasllm.recipes.masked_lm import MaskedLMTrainArgs, train_masked_lm  # noqa: PLC0415

    if not data and not resume:
        raise click.UsageError("--data is required (except with --resume)")
    args = MaskedLMTrainArgs(
        data=[str(p) for p in data], text_field=text_field, preset=preset, steps=steps, epochs=epochs,
        batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
        label_smoothing=label_smoothing, tokenizer=tokenizer, vocab_size=vocab_size, eval_interval=eval_interval,
        checkpoint_interval=checkpoint_interval,
        eval_steps=eval_steps, validation_fraction=validation_fraction, seed=seed, jit_compile=jit_compile,
    )
    with _sigterm_unwinds(distribute):
        history = train_masked_lm(args, out, config_file=config_file, resume=resume, quiet=quiet,
                                  config_overrides=overrides, distribute=distribute)
    _say_where_the_model_is(out, history)


@train.command("classifier")
@_with(_text_fields)
@click.option("--label-field", default="label", show_default=True, help="Field (column) holding the label.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Start from this masked-lm (or classifier) model directory's encoder and tokenizer.")
@click.option("--pooling", type=click.Choice(["cls", "mean"]),
              help="Pooled vector: CLS token or mean (default: cls, or the --init-from model's).")
@click.option("--tokenizer", type=click.Choice(["char", "byte", "bpe", "unigram"]), default="char",
              show_default=True, help="Tokenizer trained on the data (not with --init-from).")
@vocab_size_option
@run_options(batch_size=32, seq_len=128, lr=1e-3, weight_decay=ENCODER_WEIGHT_DECAY)
@model_override_options
def classifier(data, text_field, label_field, init_from, pooling, out, preset, config_file, steps, epochs, batch_size,
               seq_len, lr, warmup_steps, weight_decay, label_smoothing, tokenizer, vocab_size, eval_interval,
               checkpoint_interval, eval_steps, validation_fraction, seed, jit_compile, resume, quiet, overrides,
               distribute):
    """Train a text classifier (encoder + pooled head) on labelled rows, from scratch or a pretrained encoder.

    \b
    Example:
      kerasllm sample-data sentiment --out reviews.tsv
      kerasllm train classifier --data reviews.tsv --out runs/clf --epochs 3
      kerasllm train classifier --data reviews.tsv --init-from runs/mlm --out runs/clf
    """
    _refuse_with_resume(resume, out)
    from kerasllm.recipes.classifier import ClassifierTrainArgs, train_classifier  # noqa: PLC0415

    if not data and not resume:
        raise click.UsageError("--data is required (except with --resume)")
    _refuse_with_init_from(init_from)
    args = ClassifierTrainArgs(
        data=[str(p) for p in data], text_field=text_field, label_field=label_field,
        init_from=str(init_from) if init_from else None, pooling=pooling, preset=preset, steps=steps, epochs=epochs,
        batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
        label_smoothing=label_smoothing, tokenizer=tokenizer, vocab_size=vocab_size, eval_interval=eval_interval,
        checkpoint_interval=checkpoint_interval,
        eval_steps=eval_steps, validation_fraction=validation_fraction, seed=seed, jit_compile=jit_compile,
    )
    with _sigterm_unwinds(distribute):
        history = train_classifier(args, out, config_file=config_file, resume=resume, quiet=quiet,
                                   config_overrides=overrides, distribute=distribute)
    _say_where_the_model_is(out, history)


@train.command("token-classifier")
@click.option("--data", "data", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Tagged sentences: JSONL (lists of words and tags) or CoNLL (.conll: a word and its tag a line, "
                   "a blank line between sentences). Repeatable; optional with --resume.")
@click.option("--tokens-field", default="tokens", show_default=True, help="JSONL field holding the list of words.")
@click.option("--tags-field", default="tags", show_default=True, help="JSONL field holding the list of tags.")
@click.option("--format", "data_format", type=click.Choice(["auto", "jsonl", "conll"]), default="auto",
              show_default=True, help="Data format (auto: .conll is CoNLL, .jsonl/.json JSONL).")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Start from this masked-lm, classifier or token-classifier model directory's encoder and tokenizer.")
@click.option("--tokenizer", type=click.Choice(["char", "byte", "bpe", "unigram"]), default="char",
              show_default=True, help="Tokenizer trained on the data (not with --init-from).")
@vocab_size_option
@run_options(batch_size=32, seq_len=128, lr=1e-3, weight_decay=ENCODER_WEIGHT_DECAY)
@model_override_options
def token_classifier(data, tokens_field, tags_field, data_format, init_from, out, preset, config_file, steps, epochs,
                     batch_size, seq_len, lr, warmup_steps, weight_decay, label_smoothing, tokenizer, vocab_size,
                     eval_interval,
                     checkpoint_interval, eval_steps, validation_fraction, seed, jit_compile, resume, quiet, overrides,
                     distribute):
    """Train a token classifier (NER, POS tagging: one tag per word) on tagged sentences.

    Each word is tokenized on its own; its tag goes on its first token, the model learns
    nothing from the others. Tags (any names, e.g. BIO: B-PER, I-PER, O) are saved with the
    model. A sentence longer than --seq-len tokens keeps its start.

    \b
    Example:
      kerasllm sample-data ner --out ner.jsonl
      kerasllm train token-classifier --data ner.jsonl --out runs/ner --steps 300
      kerasllm train token-classifier --data train.conll --init-from runs/mlm --out runs/ner
    """
    _refuse_with_resume(resume, out)
    from kerasllm.recipes.token_classifier import TokenClassifierTrainArgs, train_token_classifier  # noqa: PLC0415

    if not data and not resume:
        raise click.UsageError("--data is required (except with --resume)")
    if label_smoothing:
        raise click.UsageError("--label-smoothing is not supported by token-classifier")
    _refuse_with_init_from(init_from)
    args = TokenClassifierTrainArgs(
        data=[str(p) for p in data], tokens_field=tokens_field, tags_field=tags_field, data_format=data_format,
        init_from=str(init_from) if init_from else None, preset=preset, steps=steps, epochs=epochs,
        batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
        tokenizer=tokenizer, vocab_size=vocab_size, eval_interval=eval_interval,
        checkpoint_interval=checkpoint_interval, eval_steps=eval_steps,
        validation_fraction=validation_fraction, seed=seed, jit_compile=jit_compile,
    )
    with _sigterm_unwinds(distribute):
        history = train_token_classifier(args, out, config_file=config_file, resume=resume, quiet=quiet,
                                         config_overrides=overrides, distribute=distribute)
    _say_where_the_model_is(out, history)


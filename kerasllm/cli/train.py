"""`kerasllm train ...`: one sub-command per task, sharing the run conventions.

Every task writes a run directory (model.keras, tokenizer.json, config.json,
history.jsonl), shows a progress bar with loss and tokens/s, validates at intervals,
checkpoints at each validation, and continues a stopped run with `--resume`.
"""

from __future__ import annotations

from pathlib import Path

import click

from kerasllm.cli.options import model_override_options, run_options


@click.group()
def train():
    """Train a model: causal-lm (GPT-like).

    \b
    Example:
      kerasllm train causal-lm --data corpus.txt --out runs/lm --steps 500
    """


@train.command("causal-lm")
@click.option("--data", "data", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Text file or directory of .txt files (repeatable). Optional with --resume.")
@click.option("--tokenizer", type=click.Choice(["char", "byte", "bpe", "unigram"]), default="char",
              show_default=True, help="Tokenizer trained on the data.")
@click.option("--vocab-size", type=int, default=4000, show_default=True, help="Subword vocabulary size (bpe, unigram).")
@click.option("--window", type=click.Choice(["random", "packed"]), default="random", show_default=True,
              help="Random windows (nanoGPT) or packed consecutive windows.")
@run_options(batch_size=12, seq_len=64, lr=1e-3)
@model_override_options
def causal_lm(data, out, preset, config_file, steps, epochs, batch_size, seq_len, lr, warmup_steps, weight_decay,
              label_smoothing, tokenizer, vocab_size, window, eval_interval, eval_steps, validation_fraction, seed,
              jit_compile, resume, quiet, overrides):
    """Pretrain a GPT-like causal language model on plain text.

    \b
    Example:
      kerasllm train causal-lm --data corpus.txt --out runs/lm --preset small --steps 2000
      kerasllm train causal-lm --out runs/lm --resume      # continue a stopped run
    """
    from kerasllm.recipes.causal_lm import CausalLMTrainArgs, train_causal_lm  # noqa: PLC0415

    if not data and not resume:
        raise click.UsageError("--data is required (except with --resume)")
    args = CausalLMTrainArgs(
        data=[str(p) for p in data], preset=preset, steps=steps, epochs=epochs, batch_size=batch_size,
        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
        label_smoothing=label_smoothing, tokenizer=tokenizer, vocab_size=vocab_size, eval_interval=eval_interval,
        eval_steps=eval_steps, validation_fraction=validation_fraction, window=window, seed=seed,
        jit_compile=jit_compile,
    )
    train_causal_lm(args, out, config_file=config_file, resume=resume, quiet=quiet, config_overrides=overrides)
    click.echo(f"kerasllm: model written to {out}", err=True)

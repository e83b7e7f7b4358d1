"""`kerasllm train masked-lm`: texts -> tokenizer -> MaskedLM (BERT-like pretraining) -> model directory.

Records come from text files (one per line), JSONL, TSV or CSV (`--text-field`). Each
text becomes `[BOS] + ids`, long ones cut into several sequences of `--seq-len`; every
batch is masked anew in tf.data (15%, 80/10/10; see `kerasllm.data_tasks`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from kerasllm.config import EncoderConfig
from kerasllm.data_tasks import encode_chunks, masked_lm_dataset, read_rows, split_validation
from kerasllm.distribute import distributed_recipe, shard_batches
from kerasllm.recipes import ENCODER_WEIGHT_DECAY
from kerasllm.recipes.common import (RunArgs, check_seq_len, model_config, resumed_args, resumed_model_config,
                                     run_directory, tokenizer_origin, warn_unknown_tokens, write_run_files)
from kerasllm.tokenizers import TextTokenizer
from kerasllm.training import check_restored_within, fit_run, plan_steps, read_run_config, restored_epoch

log = logging.getLogger("kerasllm")

TASK = "masked-lm"  # recorded in config.json; distribute.py compares it on restart


@dataclass
class MaskedLMTrainArgs(RunArgs):
    """Everything a masked-LM run needs; saved in config.json so `--resume` can repeat it."""

    data: list[str] = field(default_factory=list)
    text_field: str = "text"
    weight_decay: float = ENCODER_WEIGHT_DECAY


def encoder_config(preset: str, config_file: str | None, overrides: dict, tokenizer: TextTokenizer,
                   **changes) -> EncoderConfig:
    """The encoder config of a fresh run (`model_config`: the preset, a --config file's keys on top,
    the CLI overrides), with the tokenizer's ids."""
    ids = tokenizer.special_ids()
    return model_config(EncoderConfig, preset, config_file, overrides, **changes, vocab_size=tokenizer.vocab_size,
                        pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"], mask_id=ids["mask"])


def validation_steps(count: int, batch_size: int, eval_steps: int) -> int:
    """Validate on at most the whole validation set (in whole batches, at least one)."""
    return max(1, min(eval_steps, math.ceil(count / batch_size)))


@distributed_recipe  # --strategy/--precision: supplies `dist` (kerasllm.distribute)
def train_masked_lm(args: MaskedLMTrainArgs, out: str | Path, config_file: str | None = None, resume: bool = False,
                    quiet: bool = False, config_overrides: dict | None = None, dist=None):
    """Train (or resume) a masked LM into the run directory `out`; returns the Keras history."""
    with run_directory(out, resume=resume, is_chief=dist.is_chief) as out:  # this run's alone from here on
        if resume:
            run = read_run_config(out)
            args = resumed_args(MaskedLMTrainArgs, TASK, run, out, data=args.data)
            tokenizer = TextTokenizer.load(out)
            config = resumed_model_config(EncoderConfig, run, out)
            rows = read_rows(args.data, args.text_field)
        else:
            rows = read_rows(args.data, args.text_field)  # fails early, before anything is written
            tokenizer = TextTokenizer.train([row.text for row in rows], kind=args.tokenizer, vocab_size=args.vocab_size)
            config = encoder_config(args.preset, config_file, config_overrides or {}, tokenizer)
        check_seq_len(args.seq_len, config)
        sequences = encode_chunks(tokenizer, rows, args.seq_len)
        if dist.is_chief:
            warn_unknown_tokens(tokenizer, sequences, origin=tokenizer_origin(out, resume),
                                texts=(row.text for row in rows))
        train_seqs, val_seqs = split_validation(sequences, args.validation_fraction, args.seed)
        tokens_per_step = args.batch_size * args.seq_len
        plan = plan_steps(
            args.steps, args.epochs, max(1, len(train_seqs) // args.batch_size), args.eval_interval,
            args.checkpoint_interval,
        )
        total_steps = plan.total_steps
        if resume:
            check_restored_within(out, plan)  # before anything is written

        # Before TensorFlow's runtime starts: its threads are fixed from then on.
        dist.threads_for(config, args.jit_compile)
        write_run_files(out, resume=resume, dist=dist, args=args, task=TASK, config=config,
                        tokenizers=[(tokenizer, out)])
        import keras  # noqa: PLC0415 - TensorFlow loads here, not at CLI start

        import kerasllm.models as models  # noqa: PLC0415

        special = tokenizer.special_ids()
        seed = args.seed + restored_epoch(out)  # fresh data order and masks after a resume
        # Each worker of a multi-worker job keeps its own share of the batches (shard_batches).
        train_data = dist.distribute(lambda batch, shard, shards: shard_batches(masked_lm_dataset(
            train_seqs, batch, config.vocab_size, special, args.seq_len, seed=seed), shard, shards), args.batch_size)
        val_data = (dist.distribute(lambda batch, shard, shards: shard_batches(masked_lm_dataset(
            val_seqs, batch, config.vocab_size, special, args.seq_len, shuffle=False), shard, shards),
            args.batch_size) if val_seqs else None)
        # -- model construction and compile (the one place a strategy scope wraps) --------------
        keras.utils.set_random_seed(args.seed)  # the same --seed, the same initial weights
        model = models.MaskedLM(config)
        model.compile(learning_rate=dist.learning_rate(args.lr), total_steps=total_steps, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                      jit_compile=dist.jit_compile(args.jit_compile))
        # ---------------------------------------------------------------------------------------
        if not quiet:
            log.info("masked-lm: %s parameters, %d steps of %d sequences, vocab %d (%s)",
                     f"{model.count_params():,}", total_steps, args.batch_size, config.vocab_size, args.tokenizer)
        return fit_run(model, train_data, val_data, out, plan=plan,
                       tokens_per_step=tokens_per_step,
                       eval_steps=validation_steps(len(val_seqs), args.batch_size, args.eval_steps), quiet=quiet,
                       log_every=args.log_every, worker_index=dist.worker_index)

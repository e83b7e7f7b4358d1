"""`kerasllm train seq2seq`: source/target pairs -> tokenizer(s) -> Seq2SeqLM -> model directory.

The run directory is the causal LM's plus, with `--separate-vocab`, a second
tokenizer for the target side (`target_tokenizer.json`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from kerasllm.config import Seq2SeqConfig
from kerasllm.distribute import distributed_recipe, shard_batches
from kerasllm.errors import UsageError
from kerasllm.pairs import encode_pairs, pair_batches, read_pairs, split_pairs
from kerasllm.recipes.common import (RunArgs, check_seq_len, model_config, resumed_args, resumed_model_config,
                                     run_directory, tokenizer_origin, warn_unknown_tokens, write_run_files)
from kerasllm.tokenizers import TARGET_TOKENIZER_FILE, TextTokenizer, load_seq2seq_tokenizers
from kerasllm.training import check_restored_within, fit_run, plan_steps, read_run_config, restored_epoch

log = logging.getLogger("kerasllm")

TASK = "seq2seq"  # recorded in config.json; distribute.py compares it on restart



@dataclass
class Seq2SeqTrainArgs(RunArgs):
    """Everything a seq2seq run needs; saved in config.json so `--resume` can repeat it."""

    data: str | None = None
    source_file: str | None = None
    target_file: str | None = None
    source_field: str = "source"
    target_field: str = "target"
    separate_vocab: bool = False
    target_tokenizer: str | None = None  # kind of the target tokenizer (separate vocab); default `tokenizer`
    seq_len: int | None = None  # longest source or target accepted; None: the model's max_length


@distributed_recipe  # --strategy/--precision: supplies `dist` (kerasllm.distribute)
def train_seq2seq(args: Seq2SeqTrainArgs, out: str | Path, config_file: str | None = None, resume: bool = False,
                  quiet: bool = False, config_overrides: dict | None = None, dist=None):
    """Train (or resume) a seq2seq model into the run directory `out`; returns the Keras history."""
    with run_directory(out, resume=resume, is_chief=dist.is_chief) as out:  # this run's alone from here on
        if resume:
            run = read_run_config(out)
            # The data given again (--data, or --source-file and --target-file) replaces the saved data.
            args = resumed_args(Seq2SeqTrainArgs, TASK, run, out, data=args.data, source_file=args.source_file,
                                target_file=args.target_file)
            # The config says whether the target has its own tokenizer (a missing file had become the source's).
            source_tokenizer, target_tokenizer = load_seq2seq_tokenizers(out, run["model"])
            config = resumed_model_config(Seq2SeqConfig, run, out)
        pairs = read_pairs(args.data, args.source_file, args.target_file, args.source_field, args.target_field)
        if not resume:  # everything is checked before anything is written
            config = model_config(Seq2SeqConfig, args.preset, config_file, config_overrides or {})
            if args.seq_len is None:  # recorded as the number it stands for
                args = replace(args, seq_len=config.max_length)
            check_seq_len(args.seq_len, config)
            if args.target_tokenizer and not args.separate_vocab:
                raise UsageError("--target-tokenizer needs --separate-vocab")
            sources = [p.source for p in pairs]
            targets = [p.target for p in pairs]
            if args.separate_vocab:
                source_tokenizer = TextTokenizer.train(sources, kind=args.tokenizer, vocab_size=args.vocab_size)
                target_tokenizer = TextTokenizer.train(targets, kind=args.target_tokenizer or args.tokenizer,
                                                       vocab_size=args.vocab_size)
            else:
                source_tokenizer = target_tokenizer = TextTokenizer.train(sources + targets, kind=args.tokenizer,
                                                                          vocab_size=args.vocab_size)
            # Special ids are the same in every kerasllm tokenizer (SPECIAL_TOKENS order).
            config = config.replace(
                vocab_size=source_tokenizer.vocab_size,
                target_vocab_size=target_tokenizer.vocab_size if args.separate_vocab else 0,
                pad_id=source_tokenizer.pad_id, bos_id=source_tokenizer.bos_id, eos_id=source_tokenizer.eos_id,
                # Never targets in training, so never outputs (Seq2SeqConfig.suppress_ids); a --config's own kept.
                suppress_ids=sorted({*config.suppress_ids, *(i for name, i in target_tokenizer.special_ids().items()
                                                             if name not in ("pad", "bos", "eos"))}),
            )
        # --seq-len caps the accepted lengths further than the model's max_length (a run saved before
        # --seq-len was checked against it may record a larger one: it resumes capped, as it began).
        source_ids, target_ids = encode_pairs(pairs, source_tokenizer, target_tokenizer,
                                              min(args.seq_len or config.max_length, config.max_length))
        if dist.is_chief and resume:  # (a fresh run's tokenizers are trained on these pairs)
            for what, tokenizer, ids, texts in (("source", source_tokenizer, source_ids, (p.source for p in pairs)),
                                                ("target", target_tokenizer, target_ids, (p.target for p in pairs))):
                warn_unknown_tokens(tokenizer, ids, origin=tokenizer_origin(out, resume), texts=texts, what=what)
        train_index, val_index = split_pairs(len(pairs), args.validation_fraction, args.seed)
        tokens_per_step = args.batch_size * int(round(
            sum(len(source_ids[i]) + len(target_ids[i]) + 1 for i in train_index) / len(train_index)))
        plan = plan_steps(
            args.steps, args.epochs, max(1, len(train_index) // args.batch_size), args.eval_interval,
            args.checkpoint_interval,
        )
        total_steps = plan.total_steps
        if resume:
            check_restored_within(out, plan)  # before anything is written

        # Before TensorFlow's runtime starts: its threads are fixed from then on.
        dist.threads_for(config, args.jit_compile)
        target_file = [(target_tokenizer, out / TARGET_TOKENIZER_FILE)] if args.separate_vocab else []
        write_run_files(out, resume=resume, dist=dist, args=args, task=TASK, config=config,
                        tokenizers=[(source_tokenizer, out), *target_file])
        import keras  # noqa: PLC0415 - TensorFlow loads here, not at CLI start

        import kerasllm.models as models  # noqa: PLC0415

        # Before the input pipelines and the model: the same --seed, the same data order and weights.
        keras.utils.set_random_seed(args.seed)

        special = dict(pad_id=config.pad_id, bos_id=config.bos_id, eos_id=config.eos_id)
        # Fresh data order after a resume instead of replaying the first batches.
        seed = args.seed + restored_epoch(out)
        # Each worker of a multi-worker job keeps its own share of the batches (shard_batches).
        train_data = dist.distribute(lambda batch, shard, shards: shard_batches(pair_batches(
            [source_ids[i] for i in train_index], [target_ids[i] for i in train_index], batch, seed=seed,
            **special), shard, shards), args.batch_size)
        val_data = (dist.distribute(lambda batch, shard, shards: shard_batches(pair_batches(
            [source_ids[i] for i in val_index], [target_ids[i] for i in val_index], batch, shuffle=False,
            **special), shard, shards), args.batch_size) if len(val_index) else None)

        # -- model construction and compile (the one place to wrap in a distribution strategy) --
        model = models.Seq2SeqLM(config)
        model.compile(learning_rate=dist.learning_rate(args.lr), total_steps=total_steps, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                      jit_compile=dist.jit_compile(args.jit_compile))
        # ---------------------------------------------------------------------------------------

        if not quiet:
            log.info("seq2seq: %s parameters, %d pairs (%d held out), %d steps of batch %d, vocab %s (%s)",
                     f"{model.count_params():,}", len(pairs), len(val_index), total_steps, args.batch_size,
                     f"{config.vocab_size}/{config.target_vocab}" if args.separate_vocab else config.vocab_size,
                     args.tokenizer)
        return fit_run(model, train_data, val_data, out, plan=plan,
                       tokens_per_step=tokens_per_step, eval_steps=args.eval_steps, quiet=quiet,
                       log_every=args.log_every, worker_index=dist.worker_index)

"""`kerasllm train causal-lm`: text files -> tokenizer -> CausalLM -> model directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from kerasllm.config import DecoderConfig
from kerasllm.data import lm_windows, resolve_text_files
from kerasllm.distribute import distributed_recipe
from kerasllm.recipes.common import (RunArgs, check_seq_len, model_config, resumed_args, resumed_model_config,
                                     run_directory, tokenizer_origin, warn_unknown_tokens, write_run_files)
from kerasllm.token_cache import cached_token_split, token_cache_dir, train_corpus_tokenizer
from kerasllm.tokenizers import TextTokenizer
from kerasllm.training import check_restored_within, fit_run, plan_steps, read_run_config, restored_epoch

log = logging.getLogger("kerasllm")

TASK = "causal-lm"  # recorded in config.json; distribute.py compares it on restart


@dataclass
class CausalLMTrainArgs(RunArgs):
    """Everything a causal-LM run needs; saved in config.json so `--resume` can repeat it."""

    data: list[str] = field(default_factory=list)
    batch_size: int = 12
    seq_len: int = 64
    window: str = "random"


@distributed_recipe
def train_causal_lm(args: CausalLMTrainArgs, out: str | Path, config_file: str | None = None,
                    resume: bool = False, quiet: bool = False, config_overrides: dict | None = None,
                    extra_callbacks=(), dist=None):
    """Train (or resume) a causal LM into the run directory `out`; returns the Keras history.

    `distribute=DistributeArgs(...)` picks the strategy and precision (default: auto,
    fp32; see `kerasllm.distribute.distributed_recipe`, which supplies `dist`).
    """
    with run_directory(out, resume=resume, is_chief=dist.is_chief) as out:  # this run's alone from here on
        if resume:
            run = read_run_config(out)
            # A resumed run repeats the saved run; only the data paths may be given again.
            args = resumed_args(CausalLMTrainArgs, TASK, run, out, data=args.data)
            files = resolve_text_files(args.data)
            tokenizer = TextTokenizer.load(out)
            config = resumed_model_config(DecoderConfig, run, out)
        else:
            files = resolve_text_files(args.data)  # fails early, before anything is written
            config = model_config(DecoderConfig, args.preset, config_file, config_overrides or {})
            # Each step that takes time on a large corpus says so (a minute of silence for 107 MB of bpe).
            tokenizer = train_corpus_tokenizer(files, args.tokenizer, args.vocab_size, progress=not quiet)
            config = config.replace(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
        check_seq_len(args.seq_len, config)
        # Bad --steps/--epochs/intervals: refused before tokenizing.
        plan_steps(args.steps, args.epochs, 1, args.eval_interval, args.checkpoint_interval)
        tokens_per_step = args.batch_size * args.seq_len

        # Before TensorFlow's runtime starts: its threads are fixed from then on.
        dist.threads_for(config, args.jit_compile)
        if not resume:  # (a resumed run records its data paths once its plan is checked, below)
            write_run_files(out, resume=resume, dist=dist, args=args, task=TASK, config=config,
                            tokenizers=[(tokenizer, out)])
        with token_cache_dir(out, dist.worker_index) as tokens_dir:
            # Tokenized once into the run directory (DIR/tokens) and read through memory maps from then on.
            # (The chief alone shows it, as it alone shows the training bar: another worker's cache is scratch.)
            split = cached_token_split(tokens_dir, files, tokenizer, args.validation_fraction, args.seq_len,
                                       progress=not quiet and dist.is_chief)
            if dist.is_chief:
                warn_unknown_tokens(tokenizer, split.train, origin=tokenizer_origin(out, resume))
            plan = plan_steps(
                args.steps, args.epochs, max(1, len(split.train) // tokens_per_step), args.eval_interval,
                args.checkpoint_interval,
            )
            total_steps = plan.total_steps
            if resume:
                check_restored_within(out, plan)  # before config.json records the data given again
                write_run_files(out, resume=resume, dist=dist, args=args, task=TASK, config=config,
                                tokenizers=[(tokenizer, out)])

            import keras  # noqa: PLC0415 - TensorFlow loads here, not at CLI start

            import kerasllm.models as models  # noqa: PLC0415

            # Before the input pipelines and the model: the same --seed, the same data order and weights.
            keras.utils.set_random_seed(args.seed)

            # Fresh data order after a resume instead of replaying the first windows.
            seed = args.seed + restored_epoch(out)
            train_data = dist.distribute(
                lambda batch, shard, shards: lm_windows(split.train, args.seq_len, batch, args.window, seed=seed,
                                                        shard_index=shard, num_shards=shards), args.batch_size)
            val_data = (dist.distribute(
                lambda batch, shard, shards: lm_windows(split.validation, args.seq_len, batch, "random",
                                                        seed=args.seed + 1, shard_index=shard, num_shards=shards),
                args.batch_size) if len(split.validation) else None)
            model = models.CausalLM(config)
            model.compile(learning_rate=dist.learning_rate(args.lr), total_steps=total_steps,
                          warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                          label_smoothing=args.label_smoothing, jit_compile=dist.jit_compile(args.jit_compile))
            if not quiet:
                log.info("causal-lm: %s parameters, %d steps of %d tokens, vocab %d (%s)", f"{model.count_params():,}",
                         total_steps, tokens_per_step, config.vocab_size, args.tokenizer)
            return fit_run(model, train_data, val_data, out, plan=plan,
                           tokens_per_step=tokens_per_step, eval_steps=args.eval_steps, quiet=quiet,
                           log_every=args.log_every, worker_index=dist.worker_index, extra_callbacks=extra_callbacks)

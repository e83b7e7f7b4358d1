"""`kerasllm train token-classifier`: tagged sentences -> TokenClassifier -> model directory.

Sentences come from JSONL (a list of words under `--tokens-field`, their tags under
`--tags-field`) or CoNLL-style column files (`.conll`: a word and its tag a line, a blank line
between sentences). Tags are mapped to ids 0..L-1 and the mapping is saved in config.json as
`"labels"`, as the classifier's. Each word is tokenized on its own and its tag put on its first
piece (`kerasllm.export.word_pieces`, the same alignment `kerasllm tag` uses); the other
positions are ignored by the loss. With `--init-from MODEL_DIR` the encoder and the tokenizer
come from a masked-LM, classifier or token-classifier run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from kerasllm.config import EncoderConfig
from kerasllm.data_tasks import LabelMap, encode_tagged, read_tagged, split_validation, token_classification_dataset
from kerasllm.distribute import distributed_recipe
from kerasllm.recipes import ENCODER_WEIGHT_DECAY
from kerasllm.recipes.common import (RunArgs, check_seq_len, copy_pretrained_encoder, labelled_datasets,
                                     fine_tuning_changes, pretrained_run, resumed_args, resumed_model_config,
                                     run_directory, tokenizer_origin, warn_unknown_tokens, write_run_files)
from kerasllm.recipes.masked_lm import encoder_config, validation_steps
from kerasllm.tokenizers import TextTokenizer
from kerasllm.training import check_restored_within, fit_run, plan_steps, read_run_config, restored_epoch

log = logging.getLogger("kerasllm")

TASK = "token-classifier"
INIT_TASKS = ("masked-lm", "classifier", TASK)


@dataclass
class TokenClassifierTrainArgs(RunArgs):
    """Everything a token-classifier run needs; saved in config.json so `--resume` can repeat it."""

    data: list[str] = field(default_factory=list)
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    data_format: str = "auto"
    init_from: str | None = None
    weight_decay: float = ENCODER_WEIGHT_DECAY


@distributed_recipe  # --strategy/--precision: supplies `dist` (kerasllm.distribute)
def train_token_classifier(args: TokenClassifierTrainArgs, out: str | Path, config_file: str | None = None,
                           resume: bool = False, quiet: bool = False, config_overrides: dict | None = None,
                           dist=None):
    """Train (or resume) a token classifier into the run directory `out`; returns the Keras history."""
    with run_directory(out, resume=resume, is_chief=dist.is_chief) as out:  # this run's alone from here on
        if resume:
            run = read_run_config(out)
            args = resumed_args(TokenClassifierTrainArgs, TASK, run, out, data=args.data)
            tokenizer = TextTokenizer.load(out)
            config = resumed_model_config(EncoderConfig, run, out)
            tags = LabelMap(run["labels"])
            rows = read_tagged(args.data, args.tokens_field, args.tags_field, args.data_format)
        else:
            # fails early, before anything is written
            rows = read_tagged(args.data, args.tokens_field, args.tags_field, args.data_format)
            tags = LabelMap.from_labels([tag for row in rows for tag in row.tags])
            if args.init_from:
                changes = fine_tuning_changes({}, config_file, config_overrides)
                pretrained, tokenizer = pretrained_run(args.init_from, INIT_TASKS)
                config = EncoderConfig.from_dict(pretrained["model"]).replace(num_labels=len(tags), **changes)
            else:
                # The tokenizer learns the text as the tagger will see it: words joined by spaces.
                tokenizer = TextTokenizer.train([" ".join(row.words) for row in rows], kind=args.tokenizer,
                                                vocab_size=args.vocab_size)
                config = encoder_config(args.preset, config_file, config_overrides or {}, tokenizer,
                                        num_labels=len(tags))
        check_seq_len(args.seq_len, config)
        train_rows, val_rows = split_validation(rows, args.validation_fraction, args.seed)
        train_seqs, train_labels = encode_tagged(tokenizer, train_rows, tags, args.seq_len)
        if dist.is_chief:
            warn_unknown_tokens(tokenizer, train_seqs, origin=tokenizer_origin(out, resume, args.init_from),
                                texts=(" ".join(row.words) for row in train_rows))
        val_seqs, val_labels = encode_tagged(tokenizer, val_rows, tags, args.seq_len)
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
                        tokenizers=[(tokenizer, out)], labels=tags.labels)
        import keras  # noqa: PLC0415 - TensorFlow loads here, not at CLI start

        import kerasllm.models as models  # noqa: PLC0415

        train_data, val_data = labelled_datasets(dist, token_classification_dataset, (train_seqs, train_labels),
                                                 (val_seqs, val_labels), args.batch_size, config.pad_id, args.seq_len,
                                                 seed=args.seed + restored_epoch(out))
        # -- model construction and compile (the one place a strategy scope wraps) --------------
        keras.utils.set_random_seed(args.seed)  # the same --seed, the same initial weights
        model = models.TokenClassifier(config)
        if args.init_from and not resume:  # a resumed run restores its own checkpoint instead
            copy_pretrained_encoder(model, args.init_from)
        model.compile(learning_rate=dist.learning_rate(args.lr), total_steps=total_steps, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, jit_compile=dist.jit_compile(args.jit_compile))
        # ---------------------------------------------------------------------------------------
        if not quiet:
            log.info("token-classifier: %s parameters, %d tags, %d steps of %d sentences%s",
                     f"{model.count_params():,}", len(tags), total_steps, args.batch_size,
                     f", encoder from {args.init_from}" if args.init_from else "")
        return fit_run(model, train_data, val_data, out, plan=plan,
                       tokens_per_step=args.batch_size * args.seq_len,
                       eval_steps=validation_steps(len(val_seqs), args.batch_size, args.eval_steps), quiet=quiet,
                       log_every=args.log_every, worker_index=dist.worker_index)

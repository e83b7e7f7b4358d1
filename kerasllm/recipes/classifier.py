"""`kerasllm train classifier`: labelled texts -> TextClassifier -> model directory.

Records come from TSV/CSV (header row) or JSONL, with `--text-field` and
`--label-field`. Labels (names or numbers) are mapped to ids 0..L-1 and the mapping
is saved in config.json as `"labels"`. With `--init-from MODEL_DIR` the encoder and
the tokenizer come from a pretrained masked-LM (or classifier) run; otherwise both are
trained here from scratch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from kerasllm.config import EncoderConfig
from kerasllm.data_tasks import LabelMap, classification_dataset, encode_rows, read_rows, split_validation
from kerasllm.distribute import distributed_recipe
from kerasllm.recipes.masked_lm import encoder_config, validation_steps
from kerasllm.recipes import ENCODER_WEIGHT_DECAY
from kerasllm.recipes.common import (RunArgs, check_seq_len, copy_pretrained_encoder, labelled_datasets,
                                     fine_tuning_changes, pretrained_run, resumed_args, resumed_model_config,
                                     run_directory, tokenizer_origin, warn_unknown_tokens, write_run_files)
from kerasllm.tokenizers import TextTokenizer
from kerasllm.training import check_restored_within, fit_run, plan_steps, read_run_config, restored_epoch

log = logging.getLogger("kerasllm")

TASK = "classifier"
INIT_TASKS = ("masked-lm", TASK)


@dataclass
class ClassifierTrainArgs(RunArgs):
    """Everything a classifier run needs; saved in config.json so `--resume` can repeat it."""

    data: list[str] = field(default_factory=list)
    text_field: str = "text"
    label_field: str = "label"
    init_from: str | None = None
    pooling: str | None = None
    weight_decay: float = ENCODER_WEIGHT_DECAY


@distributed_recipe  # --strategy/--precision: supplies `dist` (kerasllm.distribute)
def train_classifier(args: ClassifierTrainArgs, out: str | Path, config_file: str | None = None, resume: bool = False,
                     quiet: bool = False, config_overrides: dict | None = None, dist=None):
    """Train (or resume) a text classifier into the run directory `out`; returns the Keras history."""
    with run_directory(out, resume=resume, is_chief=dist.is_chief) as out:  # this run's alone from here on
        changes = {"pooling": args.pooling} if args.pooling else {}
        if resume:
            run = read_run_config(out)
            args = resumed_args(ClassifierTrainArgs, TASK, run, out, data=args.data)
            tokenizer = TextTokenizer.load(out)
            config = resumed_model_config(EncoderConfig, run, out)
            labels = LabelMap(run["labels"])
            rows = read_rows(args.data, args.text_field, args.label_field)
        else:
            rows = read_rows(args.data, args.text_field, args.label_field)  # fails early, before anything is written
            labels = LabelMap.from_labels([row.label for row in rows])
            if args.init_from:
                changes = fine_tuning_changes(changes, config_file, config_overrides)
                pretrained, tokenizer = pretrained_run(args.init_from, INIT_TASKS)
                config = EncoderConfig.from_dict(pretrained["model"]).replace(num_labels=len(labels), **changes)
            else:
                tokenizer = TextTokenizer.train([row.text for row in rows], kind=args.tokenizer,
                                                vocab_size=args.vocab_size)
                config = encoder_config(args.preset, config_file, config_overrides or {}, tokenizer,
                                        num_labels=len(labels), **changes)
        check_seq_len(args.seq_len, config)
        train_rows, val_rows = split_validation(rows, args.validation_fraction, args.seed)
        train_ids, val_ids = labels.ids(train_rows), labels.ids(val_rows)
        train_seqs, val_seqs = encode_rows(tokenizer, train_rows, args.seq_len), encode_rows(tokenizer, val_rows,
                                                                                               args.seq_len)
        if dist.is_chief:
            warn_unknown_tokens(tokenizer, train_seqs, origin=tokenizer_origin(out, resume, args.init_from),
                                texts=(row.text for row in train_rows))
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
                        tokenizers=[(tokenizer, out)], labels=labels.labels)
        import keras  # noqa: PLC0415 - TensorFlow loads here, not at CLI start

        import kerasllm.models as models  # noqa: PLC0415

        train_data, val_data = labelled_datasets(dist, classification_dataset, (train_seqs, train_ids),
                                                 (val_seqs, val_ids), args.batch_size, config.pad_id, args.seq_len,
                                                 seed=args.seed + restored_epoch(out))
        # -- model construction and compile (the one place a strategy scope wraps) --------------
        keras.utils.set_random_seed(args.seed)  # the same --seed, the same initial weights
        model = models.TextClassifier(config)
        if args.init_from and not resume:  # a resumed run restores its own checkpoint instead
            copy_pretrained_encoder(model, args.init_from)
        model.compile(learning_rate=dist.learning_rate(args.lr), total_steps=total_steps, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                      jit_compile=dist.jit_compile(args.jit_compile))
        # ---------------------------------------------------------------------------------------
        if not quiet:
            log.info("classifier: %s parameters, %d labels, %d steps of %d texts%s", f"{model.count_params():,}",
                     len(labels), total_steps, args.batch_size,
                     f", encoder from {args.init_from}" if args.init_from else "")
        return fit_run(model, train_data, val_data, out, plan=plan,
                       tokens_per_step=args.batch_size * args.seq_len,
                       eval_steps=validation_steps(len(val_seqs), args.batch_size, args.eval_steps), quiet=quiet,
                       log_every=args.log_every, worker_index=dist.worker_index)

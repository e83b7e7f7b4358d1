"""`kerasllm evaluate`: metrics of a model dir or a bundle on a labelled data file. No TensorFlow here.

One evaluator per task, registered in `EVALUATORS` (task -> "module:function"); each is

    evaluate_<task>(source: Path, data: Path, *, device=None, batch_size=32, **fields) -> dict

and returns the metrics under the names `kerasllm evaluate` documents (`accuracy`,
`macro_f1`, `entity_f1`, `perplexity`, `bleu`, `chrf`, ...) plus `count` (records scored).
`fields` holds the `--text-field`, `--label-field`, `--tokens-field`, `--tags-field`,
`--source-field`, `--target-field` values; an evaluator reads the ones it needs, and `warn` (a
callable, default: the "kerasllm" logger) gets the one-line warnings (`_checked`). Sources are opened through the batch predictors
(export/predict.py), so a bundle is scored on ONNX Runtime and a model dir in Keras,
and a bad record (unreadable, missing field, unknown label) is a DataError naming its line.
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from kerasllm import metrics
from kerasllm.errors import DataError, UsageError
from kerasllm.export.batch import runtime_failure

log = logging.getLogger("kerasllm")

EVALUATORS: dict[str, str] = {
    "causal-lm": "kerasllm.evaluation:evaluate_causal_lm",
    "classifier": "kerasllm.evaluation:evaluate_classifier",
    "masked-lm": "kerasllm.evaluation:evaluate_masked_lm",
    "token-classifier": "kerasllm.evaluation:evaluate_token_classifier",
    "seq2seq": "kerasllm.export.translate_predictor:evaluate_seq2seq",
}


class Progress:
    """What an evaluator reports as it goes (the CLI's progress bar; this default shows nothing):
    `reset(total)` once it knows how many items it will score, `update(n)` as it scores them."""

    def reset(self, total: int | None = None) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def evaluate(source: str | Path, data: str | Path | None, parallel: tuple | None = None, **kwargs: Any) -> dict:
    """Metrics of `source` (model dir or bundle) on `data`, dispatched on the source's task; a seq2seq
    model's pairs may come as `parallel=(source_file, target_file)` (line-aligned) instead."""
    from kerasllm.export.predict import source_task  # noqa: PLC0415

    task = source_task(source)
    if task not in EVALUATORS:
        raise UsageError(f"{source}: no evaluation for a {task!r} model (have: {', '.join(sorted(EVALUATORS))})")
    if parallel is not None and task != "seq2seq":
        raise UsageError(f"{source}: --source-file/--target-file are pairs for a seq2seq model; a {task!r} model "
                         "is scored on --data")
    if task == "seq2seq" and parallel is not None:
        kwargs["parallel"] = tuple(Path(p) for p in parallel)
    elif task == "seq2seq":
        _require_pairs(data, kwargs.get("fmt", "auto"))
    module, attr = EVALUATORS[task].split(":")
    result = getattr(importlib.import_module(module), attr)(Path(source), data and Path(data), **kwargs)
    return {"task": task, **result}


def _require_pairs(data: str | Path, fmt: str) -> None:
    """UsageError unless `data` is a file of source/target pairs (TSV, CSV or JSONL).

    The seq2seq evaluator reads pairs with training's reader (kerasllm.pairs.read_pairs), whose
    message for any other file offers `--source-file/--target-file` (both commands have them); evaluate
    says it here, in its own options, before the model loads.
    """
    from kerasllm.export.records import detect_format  # noqa: PLC0415

    kind = detect_format(data, fmt)
    if kind not in ("tsv", "csv", "jsonl"):
        raise UsageError(f"{data}: a seq2seq model is scored on source/target pairs: give a .tsv, .csv or .jsonl "
                         f"file with --source-field and --target-field columns (read as {kind}; see --format), or "
                         "line-aligned --source-file and --target-file")


# Records scored at a time by the classifier, token-classifier and masked-LM evaluators: a file
# of any size is read twice (counted and checked, then scored) and held a window at a time. Every
# record had been held to the end, with its token ids (~0.8 kB a short record).
EVAL_WINDOW_ROWS = 8192


def _twice(read: Callable[[], Iterator], data: str | Path) -> tuple[int, Callable[[], Iterator]]:
    """`(records, read again)`: a first pass over `read()` counts the records and checks each one (a
    bad record names its line before the model loads, as when they were all held); a file or a
    directory is then read again as it is scored, anything else (a pipe) kept from the first pass."""
    if Path(data).is_file() or Path(data).is_dir():
        return sum(1 for _ in read()), read
    rows = list(read())
    return len(rows), lambda: iter(rows)


def _windows(rows: Iterator, size: int = 0) -> Iterator[list]:
    """Lists of at most `size` (default EVAL_WINDOW_ROWS) consecutive rows."""
    size = size or EVAL_WINDOW_ROWS
    window = []
    for row in rows:
        window.append(row)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _past_trained_check(predictor, warn: Callable[[str], None] | None):
    """`kerasllm classify`'s warning for texts that reach positions training never saw (`context_check`,
    once a job), or None where the source does not record its training --seq-len.

    Training cut texts at its `--seq-len`, often shorter than max_length: positions past it were
    never trained, and the metrics of texts that reach them may degrade. `warn` gets the line
    (default: a warning on the "kerasllm" logger)."""
    from kerasllm.cli.infer import context_check  # noqa: PLC0415 - TensorFlow-free, as this module

    return context_check(predictor, 0, warn or (lambda message: log.warning("warning: %s", message)))


def _checked(predictor, rows, past_trained, truncate: str = "right", **options: Any) -> list[list[int]]:
    """Token ids of every row (its `text`, or a tagged row's `words`); texts longer than the model's
    max_length keep their start unless `truncate="error"`; `options` go to `predictor.check`;
    `past_trained` (`_past_trained_check`) sees their lengths."""
    from kerasllm.export.predict import RecordError  # noqa: PLC0415

    sequences = []
    for row in rows:
        try:
            sequences.append(predictor.check(getattr(row, "words", None) or row.text, truncate=truncate, **options))
        except RecordError as err:
            raise DataError(f"{row.where}: {err}") from None
    if past_trained is not None:
        past_trained([len(ids) for ids in sequences])
    return sequences


def _by_length(sequences, batch_size):
    """Batches of indices, shortest first (little padding); results are put back by index."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def evaluate_classifier(source: Path, data: Path, *, device: str | None = None, batch_size: int = 32,
                        text_field: str = "text", label_field: str = "label", fmt: str = "auto",
                        warn: Callable[[str], None] | None = None,
                        progress: Progress | None = None, **_: Any) -> dict:
    """`accuracy` and `macro_f1` of a text classifier on labelled rows."""
    from kerasllm.data_tasks import LabelMap, iter_rows  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415

    count, rows = _twice(lambda: iter_rows(data, text_field, label_field, fmt=fmt), data)
    predictor = load_predictor("classify", source, device=device)
    labels = LabelMap(predictor.labels)
    past_trained = _past_trained_check(predictor, warn)
    references, predictions = [], []
    progress = progress or Progress()
    progress.reset(count)
    for window in _windows(rows()):
        references.append(np.asarray(labels.ids(window), np.int64))  # an unknown label names its line
        sequences = _checked(predictor, window, past_trained)
        chosen = np.zeros(len(window), dtype=np.int64)
        for indices in _by_length(sequences, batch_size):
            with runtime_failure([window[i].where for i in sorted(indices)]):
                logits = predictor.outputs([sequences[i] for i in indices], ["logits"])["logits"]
            chosen[indices] = np.argmax(logits, axis=-1)
            progress.update(len(indices))
        predictions.append(chosen)
    y_true, y_pred = np.concatenate(references), np.concatenate(predictions)
    return {"count": count, "accuracy": metrics.accuracy(y_true, y_pred),
            "macro_f1": metrics.macro_f1(y_true, y_pred, num_labels=len(labels))}


def evaluate_token_classifier(source: Path, data: Path, *, device: str | None = None, batch_size: int = 32,
                              tokens_field: str = "tokens", tags_field: str = "tags", fmt: str = "auto",
                              warn: Callable[[str], None] | None = None,
                              progress: Progress | None = None, **_: Any) -> dict:
    """`accuracy` (per word) and `macro_f1` (over the tag ids) of a token classifier on tagged
    sentences (JSONL or CoNLL, as in training), and with BIO (IOB2) tags the entity-level
    `entity_f1`, `entity_precision` and `entity_recall` (conlleval rules, `metrics.entity_scores`), and
    per entity type under `entity_types`.

    Every word is scored: a sentence longer than the model allows is a DataError naming its line.
    """
    from kerasllm.data_tasks import LabelMap, iter_tagged  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415

    count, rows = _twice(lambda: iter_tagged(data, tokens_field, tags_field, fmt=fmt), data)
    predictor = load_predictor("tag", source, device=device)
    tags = LabelMap(predictor.labels)
    past_trained = _past_trained_check(predictor, warn)
    bio = metrics.is_bio(tags.labels)
    references, predictions, entities = [], [], {}
    progress = progress or Progress()
    progress.reset(count)
    for window in _windows(rows()):
        truth = [np.asarray([tags.id(tag, row.where, what="tag") for tag in row.tags]) for row in window]
        sentences = _checked(predictor, window, past_trained, truncate="error", hint=None)  # (no --truncate)
        chosen: list[np.ndarray] = [np.zeros(0, np.int64)] * len(window)
        for indices in _by_length(sentences, batch_size):
            with runtime_failure([window[i].where for i in sorted(indices)]):
                probabilities_of = predictor.word_probabilities([sentences[i] for i in indices])
            for i, probabilities in zip(indices, probabilities_of):
                chosen[i] = probabilities.argmax(-1)
            progress.update(len(indices))
        references.extend(truth)
        predictions.extend(chosen)
        if bio:
            metrics.count_entities([row.tags for row in window], [[tags.labels[i] for i in p] for p in chosen],
                                   entities)
    y_true, y_pred = np.concatenate(references), np.concatenate(predictions)
    result = {"count": count, "words": int(y_true.size), "accuracy": metrics.accuracy(y_true, y_pred),
              "macro_f1": metrics.macro_f1(y_true, y_pred, num_labels=len(tags))}
    if bio:
        result.update(metrics.entity_scores_of(entities))
    return result


def evaluate_masked_lm(source: Path, data: Path, *, device: str | None = None, batch_size: int = 32,
                       text_field: str = "text", fmt: str = "auto", seed: int = 0,
                       warn: Callable[[str], None] | None = None,
                       progress: Progress | None = None, **_: Any) -> dict:
    """`perplexity` on masked positions: 15% of the tokens masked (80/10/10) with a fixed seed (one
    random stream over the whole file, window after window: the same masks as all at once)."""
    from kerasllm.data_tasks import iter_rows, mask_for_evaluation  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415

    count, rows = _twice(lambda: iter_rows(data, text_field, fmt=fmt), data)
    predictor = load_predictor("embed", source, device=device)
    c = predictor.config
    past_trained = _past_trained_check(predictor, warn)
    # The ids training never masks (data_tasks.masked_lm_dataset): padding, BOS, EOS and SEP.
    special = {int(c["pad_id"]), int(c["bos_id"]), int(c["eos_id"]), int(predictor.tokenizer.special_ids()["sep"])}
    rng = np.random.default_rng(seed)
    total_nll, masked_tokens = 0.0, 0
    progress = progress or Progress()
    progress.reset(count)
    for window in _windows(rows()):
        sequences = _checked(predictor, window, past_trained)
        masked, targets = mask_for_evaluation(sequences, int(c["vocab_size"]), int(c["mask_id"]), special, seed=rng)
        by_row: dict[int, list[tuple[int, int]]] = {}
        for row, position, original in targets:
            by_row.setdefault(row, []).append((position, original))
        for indices in _by_length(masked, batch_size):
            with runtime_failure([window[i].where for i in sorted(indices)]):
                logits = predictor.outputs([masked[i] for i in indices], ["logits"])["logits"]
            for k, i in enumerate(indices):
                for position, original in by_row.get(i, []):
                    total_nll += float(metrics.token_nll(logits[k, position], np.asarray(original)))
                    masked_tokens += 1
            progress.update(len(indices))
    return {"count": count, "masked_tokens": masked_tokens,
            "perplexity": float(np.exp(total_nll / masked_tokens)) if masked_tokens else math.nan}


def evaluate_causal_lm(source: Path, data: Path, *, device: str | None = None, batch_size: int = 32,
                       text_field: str = "text", fmt: str = "auto", progress: Progress | None = None,
                       **_: Any) -> dict:
    """`perplexity` of a causal LM: every token of a record predicted once from the ones before it.

    A record is a line of a text file or the text field of a JSONL/TSV/CSV row. The context is
    what the model was trained on (`--seq-len`, recorded in the model dir and the bundle; else
    its `max_length`): positions past it were never trained, and scoring them measured the
    untrained position embeddings (perplexity 29.0 instead of 1.17 on the README's corpus, ~200
    tokens a line, trained at 64). A longer record is scored in sliding windows of that length
    moving by half of it (`context_windows`, as Hugging Face's perplexity guide does), so every
    token after the first is predicted once, from at least half a window of text before it
    except near the record's start. Windows are forward passes (no cache), left-padded in
    batches of similar lengths; a record of one token predicts nothing.
    """
    from kerasllm.data_tasks import iter_rows  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415
    from kerasllm.export.runtime import flush_denormals  # noqa: PLC0415

    count, rows = _twice(lambda: iter_rows(data, text_field, fmt=fmt), data)
    predictor = load_predictor("generate", source, device=device)
    context = min(predictor.trained_seq_len or predictor.max_length, predictor.max_length)
    # The windows of `EVAL_WINDOW_TOKENS` tokens of records at a time (sorted by length within them),
    # and a running sum of their losses: every window and every token's loss of the whole file had
    # been held to the end (~70 bytes a character: 2.8 GB for 40 MB of text).
    total, predicted = 0.0, 0
    windows, where, tokens = [], [], 0  # the windows of the records read so far, the record each is of
    progress = progress or Progress()
    progress.reset(count)
    scored = 0  # records whose windows are scored
    with flush_denormals():  # a bundle's ORT kernels run on this thread (see runtime.flush_denormals)
        for number, row in enumerate(rows(), 1):
            for window in context_windows(predictor.tokenizer.encode(row.text), context):
                windows.append(window)
                where.append(row.where)
                tokens += len(window[0])
            if tokens >= EVAL_WINDOW_TOKENS or number == count:
                nll = _causal_nll(predictor, windows, batch_size, where)
                total, predicted = total + float(np.sum(nll, dtype=np.float64)), predicted + len(nll)
                windows, where, tokens = [], [], 0
                progress.update(number - scored)
                scored = number
    if not predicted:
        raise DataError(f"{data}: no record has two tokens (nothing to predict)")
    return {"count": count, "predicted_tokens": predicted, "context": context,
            "perplexity": float(np.exp(total / predicted))}


# Tokens of windows scored at a time by `evaluate_causal_lm` (~40 bytes each while held).
EVAL_WINDOW_TOKENS = 1 << 20


def context_windows(tokens: list[int], context: int) -> list[tuple[list[int], int]]:
    """`(window, scored)` pairs covering `tokens`: windows of `context` tokens (fewer only when the
    record is shorter), each ending `context // 2` tokens after the previous one (the last at the
    record's end); `scored` is how many of the window's last tokens it predicts, those no earlier
    window predicted. Every token but the first is predicted exactly once."""
    if len(tokens) < 2:
        return []
    context = max(2, context)  # a window predicts from at least one token
    stride = max(1, context // 2)
    windows, done, end = [], 1, min(context, len(tokens))  # tokens[:done] are predicted (the first never is)
    while True:
        windows.append((tokens[max(0, end - context):end], end - done))
        if end == len(tokens):
            return windows
        done, end = end, min(end + stride, len(tokens))


def _causal_nll(predictor, windows: list[tuple[list[int], int]], batch_size: int, where: list[str]) -> list[float]:
    """Negative log-likelihoods of each window's last `scored` tokens, in left-padded batches of
    similar lengths; `where` names each window's record (`runtime_failure`)."""
    nll: list[float] = []
    for indices in _by_length([tokens for tokens, _ in windows], batch_size):
        batch = [windows[i] for i in indices]
        width = max(len(tokens) for tokens, _ in batch)
        ids = np.full((len(batch), width), predictor.pad_id, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for k, (tokens, _) in enumerate(batch):
            ids[k, width - len(tokens):], mask[k, width - len(tokens):] = tokens, 1
        with runtime_failure(list(dict.fromkeys(where[i] for i in sorted(indices)))):  # each record once
            logits, _ = predictor.step(ids, mask, None)
        for k, (tokens, scored) in enumerate(batch):
            # logits at position p predict the token at p + 1: the last `scored` targets.
            predicted = logits[k, width - 1 - scored:width - 1]
            nll.extend(metrics.token_nll(predicted, np.asarray(tokens[-scored:])).tolist())
    return nll

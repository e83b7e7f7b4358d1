"""`kerasllm evaluate`: metrics of a model dir or a bundle on a labelled data file. No TensorFlow here.

One evaluator per task, registered in `EVALUATORS` (task -> "module:function"); each is

    evaluate_<task>(source: Path, data: Path, *, device=None, batch_size=32, **fields) -> dict

and returns the metrics under the names `kerasllm evaluate` documents (`accuracy`,
`macro_f1`, `perplexity`, `bleu`, `chrf`) plus `count` (records scored). `fields` holds
the `--text-field`, `--label-field`, `--source-field`, `--target-field` values; an
evaluator reads the ones it needs. Sources are opened through the batch predictors
(export/predict.py), so a bundle is scored on ONNX Runtime and a model dir in Keras,
and a bad record (unreadable, missing field, unknown label) is a DataError naming its line.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from kerasllm import metrics
from kerasllm.errors import DataError, UsageError

EVALUATORS: dict[str, str] = {
    "causal-lm": "kerasllm.evaluation:evaluate_causal_lm",
    "classifier": "kerasllm.evaluation:evaluate_classifier",
    "masked-lm": "kerasllm.evaluation:evaluate_masked_lm",
    "seq2seq": "kerasllm.export.translate_predictor:evaluate_seq2seq",
}


def evaluate(source: str | Path, data: str | Path, **kwargs: Any) -> dict:
    """Metrics of `source` (model dir or bundle) on `data`, dispatched on the source's task."""
    from kerasllm.export.predict import source_task  # noqa: PLC0415

    task = source_task(source)
    if task not in EVALUATORS:
        raise UsageError(f"{source}: no evaluation for a {task!r} model (have: {', '.join(sorted(EVALUATORS))})")
    module, attr = EVALUATORS[task].split(":")
    result = getattr(importlib.import_module(module), attr)(Path(source), Path(data), **kwargs)
    return {"task": task, **result}


def _checked(predictor, rows) -> list[list[int]]:
    """Token ids of every row; texts longer than the model keep their start (as in training)."""
    from kerasllm.export.predict import RecordError  # noqa: PLC0415

    sequences = []
    for row in rows:
        try:
            sequences.append(predictor.check(row.text, truncate="right"))
        except RecordError as err:
            raise DataError(f"{row.where}: {err}") from None
    return sequences


def _by_length(sequences, batch_size):
    """Batches of indices, shortest first (little padding); results are put back by index."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def evaluate_classifier(source: Path, data: Path, *, device: str | None = None, batch_size: int = 32,
                        text_field: str = "text", label_field: str = "label", fmt: str = "auto", **_: Any) -> dict:
    """`accuracy` and `macro_f1` of a text classifier on labelled rows."""
    from kerasllm.data_tasks import LabelMap, read_rows  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415

    rows = read_rows(data, text_field, label_field, fmt=fmt)
    predictor = load_predictor("classify", source, device=device)
    labels = LabelMap(predictor.labels)
    references = labels.ids(rows)  # an unknown label names its line
    sequences = _checked(predictor, rows)
    predictions = np.zeros(len(rows), dtype=np.int64)
    for indices in _by_length(sequences, batch_size):
        logits = predictor.outputs([sequences[i] for i in indices], ["logits"])["logits"]
        predictions[indices] = np.argmax(logits, axis=-1)
    return {"count": len(rows), "accuracy": metrics.accuracy(references, predictions),
            "macro_f1": metrics.macro_f1(references, predictions, num_labels=len(labels))}


def evaluate_masked_lm(source: Path, data: Path, *, device: str | None = None, batch_size: int = 32,
                       text_field: str = "text", fmt: str = "auto", seed: int = 0, **_: Any) -> dict:
    """`perplexity` on masked positions: 15% of the tokens masked (80/10/10) with a fixed seed."""
    from kerasllm.data_tasks import mask_for_evaluation, read_rows  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415

    rows = read_rows(data, text_field, fmt=fmt)
    predictor = load_predictor("embed", source, device=device)
    c = predictor.config
    sequences = _checked(predictor, rows)
    special = {int(c["pad_id"]), int(c["bos_id"]), int(c["eos_id"])}
    masked, targets = mask_for_evaluation(sequences, int(c["vocab_size"]), int(c["mask_id"]), special, seed=seed)
    by_row: dict[int, list[tuple[int, int]]] = {}
    for row, position, original in targets:
        by_row.setdefault(row, []).append((position, original))
    nll = []
    for indices in _by_length(masked, batch_size):
        logits = predictor.outputs([masked[i] for i in indices], ["logits"])["logits"]
        for k, i in enumerate(indices):
            for position, original in by_row.get(i, []):
                nll.append(float(metrics.token_nll(logits[k, position], np.asarray(original))))
    return {"count": len(rows), "masked_tokens": len(nll), "perplexity": metrics.perplexity(nll)}


def evaluate_causal_lm(source: Path, data: Path, *, device: str | None = None, batch_size: int = 32,
                       text_field: str = "text", fmt: str = "auto", **_: Any) -> dict:
    """`perplexity` of a causal LM: every token of a record predicted from the ones before it.

    A record is a line of a text file or the text field of a JSONL/TSV/CSV row; a text longer
    than the model keeps its first `max_length` tokens. The whole record is one forward pass
    (no cache), left-padded in batches of similar lengths; a record of one token predicts nothing.
    """
    from kerasllm.data_tasks import read_rows  # noqa: PLC0415
    from kerasllm.export.predict import load_predictor  # noqa: PLC0415
    from kerasllm.export.runtime import flush_denormals  # noqa: PLC0415

    rows = read_rows(data, text_field, fmt=fmt)
    predictor = load_predictor("generate", source, device=device)
    sequences = [predictor.tokenizer.encode(row.text)[:predictor.max_length] for row in rows]
    with flush_denormals():  # a bundle's ORT kernels run on this thread (see runtime.flush_denormals)
        nll = _causal_nll(predictor, sequences, batch_size)
    if not nll:
        raise DataError(f"{data}: no record has two tokens (nothing to predict)")
    return {"count": len(rows), "predicted_tokens": len(nll), "perplexity": metrics.perplexity(nll)}


def _causal_nll(predictor, sequences: list[list[int]], batch_size: int) -> list[float]:
    """Per-token negative log-likelihoods of `sequences`, left-padded batches of similar lengths."""
    nll: list[float] = []
    for indices in _by_length(sequences, batch_size):
        batch = [sequences[i] for i in indices if len(sequences[i]) > 1]
        if not batch:
            continue
        width = max(len(s) for s in batch)
        ids = np.full((len(batch), width), predictor.pad_id, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for k, tokens in enumerate(batch):
            ids[k, width - len(tokens):], mask[k, width - len(tokens):] = tokens, 1
        logits, _ = predictor.step(ids, mask, None)
        for k, tokens in enumerate(batch):
            start = width - len(tokens)
            nll.extend(metrics.token_nll(logits[k, start:width - 1], np.asarray(tokens[1:])).tolist())
    return nll

"""`classify` and `embed` predictors for the encoder family: a bundle on ONNX Runtime, or a model dir in Keras.

Both sources run the same graph (`export_outputs(input_ids, attention_mask)`: pooled
`embeddings`, and `logits`), on the same right-padded batches, so their results agree
within the export's parity tolerance. Options (names shared with the batch CLI):

    classify  top_k=None: keep the k most probable labels in "scores" (default all)
    embed     normalize=False: scale each embedding to unit length

Results: classify `{"label": str, "scores": {label: probability}}` (most probable first),
embed `{"embedding": [float, ...]}`. `check` turns a text into `[BOS] + ids`; an empty
text, or (with `truncate="error"`) one longer than the model allows, is a RecordError.

The bundle predictor imports no TensorFlow; the model-dir one imports it when loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kerasllm.errors import UsageError
from kerasllm.export.predict import RecordError

CLASSIFY_TASKS = ("classifier",)
EMBED_TASKS = ("classifier", "masked-lm")


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int):
    """Right-pad to `[B, T]` int64 ids and attention mask (T = the longest sequence)."""
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return ids, mask


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class EncoderPredictor:
    """Tokenization, batching and results; `run(ids, mask) -> {output name: array}` does the compute.

    Args:
        task: "classify" or "embed".
        model_task: the source's task ("classifier", "masked-lm").
        tokenizer: the source's `TextTokenizer`.
        config: the encoder config dict.
        labels: label names by id (classifiers).
        run: `run(input_ids, attention_mask, names) -> {name: np.ndarray}`.
    """

    def __init__(self, task: str, model_task: str, tokenizer, config: dict, labels: Sequence[str] | None,
                 run: Callable, source: Path):
        allowed = CLASSIFY_TASKS if task == "classify" else EMBED_TASKS
        if model_task not in allowed:
            raise UsageError(f"{source}: a {model_task!r} model cannot {task} (needs {' or '.join(allowed)})")
        if task == "classify" and not labels:
            raise UsageError(f"{source}: no label names saved with this classifier")
        self.task = task
        self.tokenizer = tokenizer
        self.config = config
        self.labels = list(labels or [])
        self.max_length = int(config["max_length"])
        self.bos_id, self.pad_id = int(config["bos_id"]), int(config["pad_id"])
        self._run = run

    def check(self, text: str, truncate: str = "error") -> list[int]:
        """`[BOS] + ids` of a text, at most `max_length` tokens."""
        if not text or not text.strip():
            raise RecordError("empty text")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RecordError("text has no tokens")
        limit = self.max_length - 1
        if len(ids) > limit:
            if truncate == "left":
                ids = ids[-limit:]
            elif truncate == "right":
                ids = ids[:limit]
            else:
                raise RecordError(f"text of {len(ids)} tokens is longer than the model's {limit} "
                                  "(use --truncate right to keep its start)")
        return [self.bos_id] + ids

    def outputs(self, batch: Sequence[list[int]], names: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = pad_batch(batch, self.pad_id)
        return self._run(ids, mask, list(names))

    def predict(self, batch: Sequence[list[int]], top_k: int | None = None, normalize: bool = False,
                **_: Any) -> list[dict]:
        if self.task == "embed":
            vectors = self.outputs(batch, ["embeddings"])["embeddings"].astype(np.float64)
            if normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
            return [{"embedding": [round(float(v), 7) for v in row]} for row in vectors]
        probabilities = softmax(self.outputs(batch, ["logits"])["logits"])
        results = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:top_k or len(row)]
            results.append({"label": self.labels[int(order[0])],
                            "scores": {self.labels[int(i)]: round(float(row[i]), 6) for i in order}})
        return results


def _bundle(path: Path, task: str, device: str | None = None, threads: int | None = None) -> EncoderPredictor:
    from kerasllm.export.bundle import load_bundle  # noqa: PLC0415
    from kerasllm.export.runtime import create_session  # noqa: PLC0415

    bundle = load_bundle(path)
    if bundle.family != "encoder":
        raise UsageError(f"{path}: a {bundle.family} bundle cannot {task} (needs an encoder bundle)")
    session = create_session(bundle.graph_path("model"), device, threads).session

    def run(ids, mask, names):
        return dict(zip(names, session.run(names, {"input_ids": ids, "attention_mask": mask})))

    return EncoderPredictor(task, bundle.task, bundle.tokenizer(), bundle.config, bundle.manifest.get("labels"),
                            run, path)


def _modeldir(path: Path, task: str) -> EncoderPredictor:
    from kerasllm.modeldir import load_model_dir  # noqa: PLC0415 - imports TensorFlow

    model, tokenizer, run_config = load_model_dir(path)
    if run_config["model"]["family"] != "encoder":
        raise UsageError(f"{path}: a {run_config['model']['family']} model cannot {task} (needs an encoder)")

    def run(ids, mask, names):
        outputs = model.export_outputs(ids.astype("int32"), mask)
        return {name: np.asarray(outputs[name]) for name in names}

    return EncoderPredictor(task, run_config["task"], tokenizer, run_config["model"], run_config.get("labels"),
                            run, path)


def load_classify_bundle(path: Path, device: str | None = None, **kwargs: Any) -> EncoderPredictor:
    return _bundle(path, "classify", device, kwargs.get("threads"))


def load_embed_bundle(path: Path, device: str | None = None, **kwargs: Any) -> EncoderPredictor:
    return _bundle(path, "embed", device, kwargs.get("threads"))


def load_classify_modeldir(path: Path, device: str | None = None, **kwargs: Any) -> EncoderPredictor:
    return _modeldir(path, "classify")


def load_embed_modeldir(path: Path, device: str | None = None, **kwargs: Any) -> EncoderPredictor:
    return _modeldir(path, "embed")

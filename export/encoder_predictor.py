"""`classify`, `embed` and `tag` predictors for the encoder family: a bundle on ONNX Runtime, or a model dir in Keras.

Both sources run the same graph (`export_outputs(input_ids, attention_mask)`: pooled
`embeddings`, and `logits`), on the same right-padded batches, so their results agree
within the export's parity tolerance. Options (names shared with the batch CLI):

    classify  top_k=None: keep the k most probable labels in "scores" (default all)
    embed     normalize=False: scale each embedding to unit length
    tag       none

An unknown option name, or a top_k below 1, is a UsageError; an empty batch gets [].

Results: classify `{"label": str, "scores": {label: probability}}` (most probable first),
embed `{"embedding": [float, ...]}`, tag `{"tokens": [word, ...], "tags": [tag, ...],
"scores": [probability of each tag, ...]}`. `check` turns a text into `[BOS] + ids` (tag: a
text split on whitespace, or a list of words, into `WordPieces`, see export/word_pieces.py);
an empty text, or (with `truncate="error"`) one longer than the model allows, is a RecordError.

A bundle on the CPU runs each batch as several sessions of at most `CPU_RUN_TOKENS` padded
tokens, rows of similar length together, each padded only to its own longest row (see
`EncoderPredictor.outputs`); results come back in the batch's order, unchanged.

The bundle predictor imports no TensorFlow; the model-dir one imports it when loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kerasllm.errors import KerasLLMError, UsageError
from kerasllm.export.batch import TASK_DEFAULTS, plan_batches
from kerasllm.export.generate import check_token_ids
from kerasllm.export.predict import RecordError, check_labels, check_text, kept_end, trained_seq_len
from kerasllm.tokenizers import token_count
from kerasllm.export.word_pieces import TRUNCATE_HINT, WordPieces, align_words

# predictor task -> the model tasks that can do it
MODEL_TASKS = {"classify": ("classifier",), "embed": ("classifier", "masked-lm"), "tag": ("token-classifier",)}
# Padded tokens per ONNX Runtime call on the CPU. A layer's widest activation then stays
# about the size of a core's L2 cache (1024 tokens x 512 FFN x 4 bytes = 2 MiB on the 'small'
# preset) instead of streaming through memory between ops, and rows of similar length share
# a call, so less padding is computed. 'small' preset, batches of 64 x 128 with a third of
# the rows padded, 2-core CPU: 773 seq/s in one call, 971 in runs of 1024 tokens (2048:
# 921, 3072: 846), with outputs within 1e-6 of one call's.
CPU_RUN_TOKENS = 1024


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
        task: "classify", "embed" or "tag" (`TagPredictor`).
        model_task: the source's task ("classifier", "masked-lm", "token-classifier").
        tokenizer: the source's `TextTokenizer`.
        config: the encoder config dict.
        labels: label (tag) names by id (classifiers, token classifiers).
        run: `run(input_ids, attention_mask, names) -> {name: np.ndarray}`.
        run_tokens: split a batch into calls of `run` of at most this many padded tokens
            (None: one call per batch).
        train: the source's `train` record: its `seq_len` (`trained_seq_len`), past which the
            batch CLI warns.
    """

    def __init__(self, task: str, model_task: str, tokenizer, config: dict, labels: Sequence[str] | None,
                 run: Callable, source: Path, run_tokens: int | None = None, train: dict | None = None):
        allowed = MODEL_TASKS[task]
        if model_task not in allowed:
            raise UsageError(f"{source}: a {model_task!r} model cannot {task} (needs {' or '.join(allowed)})")
        if task in ("classify", "tag") and not labels:
            raise UsageError(f"{source}: no label names saved with this {model_task}")
        if labels and len(labels) != int(config.get("num_labels") or 0):
            # One name per output of the head, or a label is never given (too many names) or indexing
            # fails mid-job (too few): an edited manifest.json or config.json.
            raise KerasLLMError(f"{source}: {len(labels)} label names saved for a model with "
                                f"{config.get('num_labels')} outputs (config num_labels)")
        self.task = task
        self.tokenizer = tokenizer
        self.config = config
        self.labels = list(labels or [])
        self.max_length = int(config["max_length"])
        self.trained_seq_len = trained_seq_len(train)
        self.bos_id, self.pad_id = int(config["bos_id"]), int(config["pad_id"])
        self._run = run
        self.run_tokens = run_tokens

    def check(self, text: str, truncate: str = "error") -> list[int]:
        """`[BOS] + ids` of a text, at most `max_length` tokens."""
        if not check_text(text).strip():
            raise RecordError("empty text")
        limit = self.max_length - 1
        ids, whole = self.tokenizer.encode_bounded(text, limit, keep=kept_end(truncate))
        if not ids:
            raise RecordError("text has no tokens")
        if len(ids) > limit:
            if truncate == "left":
                ids = ids[-limit:]
            elif truncate == "right":
                ids = ids[:limit]
            else:
                raise RecordError(f"text of {token_count(ids, whole, limit)} tokens is longer than the model's "
                                  f"max_length {self.max_length} allows (at most {limit} and the start token; "
                                  "--truncate right keeps its start)")
        return [self.bos_id] + ids

    def outputs(self, batch: Sequence[list[int]], names: Sequence[str]) -> dict[str, np.ndarray]:
        """`{name: array}` for the right-padded `batch`: `[B, ...]`, per-token outputs `[B, T, ...]`.

        With `run_tokens`, the rows go through `run` in groups planned by `plan_batches`
        (shortest first, at most `run_tokens` padded tokens each) and are put back in order.
        Real positions get the same values either way (a row's outputs never depend on the
        other rows or on its padding); per-token values at padding positions are unspecified.
        """
        check_token_ids(batch, int(self.config["vocab_size"]), "text", max_length=self.max_length)
        runs = plan_batches([len(s) for s in batch], len(batch), self.run_tokens) if self.run_tokens else []
        if len(runs) <= 1:
            return self._run(*pad_batch(batch, self.pad_id), list(names))
        length = max(len(s) for s in batch)
        results: dict[str, np.ndarray] = {}
        for rows in runs:
            for name, value in self._run(*pad_batch([batch[i] for i in rows], self.pad_id), list(names)).items():
                if name not in results:  # per-token outputs [B, T, ...] grow to the batch's length
                    per_token = value.ndim == 3
                    shape = (len(batch), length, *value.shape[2:]) if per_token else (len(batch), *value.shape[1:])
                    results[name] = np.zeros(shape, value.dtype)
                results[name][rows, :value.shape[1]] = value
        return results

    def options(self, **options: Any) -> dict[str, Any]:
        """The options with their defaults (`batch.TASK_DEFAULTS`): UsageError for an unknown name,
        a `top_k` that is not a whole number >= 1 (None: all labels) or a `normalize` that is not a bool."""
        known = TASK_DEFAULTS[self.task]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UsageError(f"{self.task}: unknown option {unknown[0]!r}"
                             f" (known: {', '.join(sorted(known)) or 'none'})")
        options = {**known, **options}
        top_k = options.get("top_k")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise UsageError(f"{self.task}: top_k must be a whole number >= 1 (or None for all labels), got {top_k!r}")
        normalize = options.get("normalize", False)
        if not isinstance(normalize, (bool, np.bool_)):
            # Used for its truth value, normalize="no" (a query parameter's string) had normalized.
            raise UsageError(f"{self.task}: normalize must be True or False, got {normalize!r}")
        return options

    def predict(self, batch: Sequence[list[int]], **options: Any) -> list[dict]:
        options = self.options(**options)
        if not len(batch):  # (a 2-D NumPy batch has no truth value)
            return []
        if self.task == "embed":
            vectors = self.outputs(batch, ["embeddings"])["embeddings"].astype(np.float64)
            if options["normalize"]:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
            return [{"embedding": [round(float(v), 7) for v in row]} for row in vectors]
        probabilities = softmax(self.outputs(batch, ["logits"])["logits"])
        top_k = options["top_k"]
        results = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:top_k or len(row)]
            results.append({"label": self.labels[int(order[0])],
                            "scores": {self.labels[int(i)]: round(float(row[i]), 6) for i in order}})
        return results


class TagPredictor(EncoderPredictor):
    """`tag`: one tag per word, from the logits at the word's first piece, with its probability.

    `check` takes a text (split on whitespace into words) or a list of words and aligns them as
    training did (`align_words`); with `truncate` "right" ("left") a sentence too long for the
    model keeps its first (last) words, and the result's `tokens` are those words.
    """

    def check(self, text: str | Sequence[str], truncate: str = "error", hint: str | None = TRUNCATE_HINT) -> WordPieces:
        """`hint` ends the error for a sentence too long (default: `kerasllm tag`'s --truncate)."""
        if isinstance(text, str):
            words = check_text(text).split()
        elif isinstance(text, (list, tuple)):
            words = [check_text(word, "word") for word in text]
        else:  # (a dict or a number had been taken apart as words, or failed in the tokenizer)
            raise UsageError(f"text must be a str or a list of words, got {type(text).__name__}")
        return align_words(self.tokenizer, words, self.bos_id, self.max_length, truncate, hint)

    def word_probabilities(self, batch: Sequence[WordPieces]) -> list[np.ndarray]:
        """Per sentence, the tag probabilities `[words, L]` at each word's first piece."""
        logits = self.outputs(batch, ["logits"])["logits"]
        return [softmax(row[pieces.starts]) for row, pieces in zip(logits, batch)]

    def predict(self, batch: Sequence[WordPieces], **options: Any) -> list[dict]:
        self.options(**options)
        if not len(batch):
            return []
        results = []
        for pieces, probabilities in zip(batch, self.word_probabilities(batch)):
            chosen = probabilities.argmax(-1)
            results.append({"tokens": pieces.words, "tags": [self.labels[int(i)] for i in chosen],
                            "scores": [round(float(p[i]), 6) for p, i in zip(probabilities, chosen)]})
        return results


def _predictor_class(task: str) -> type[EncoderPredictor]:
    return TagPredictor if task == "tag" else EncoderPredictor


def _bundle(path: Path, task: str, device: str | None = None, threads: int | None = None) -> EncoderPredictor:
    from kerasllm.export.bundle import load_bundle  # noqa: PLC0415

    bundle = load_bundle(path)
    if bundle.family != "encoder":
        raise UsageError(f"{path}: a {bundle.family} bundle cannot {task} (needs an encoder bundle)")
    labels = bundle.manifest.get("labels")
    if labels is not None:  # (a model dir's are checked as its config.json is read)
        check_labels(labels, path / "manifest.json")
    session = bundle.open_session("model", device, threads)
    return session_predictor(session, task, bundle.task, bundle.tokenizer(), bundle.config, labels, path,
                             train=bundle.manifest.get("train"))


def session_predictor(session, task: str, model_task: str, tokenizer, config: dict, labels: Sequence[str] | None,
                      source: Path, train: dict | None = None) -> EncoderPredictor:
    """An `EncoderPredictor` over an encoder graph's `runtime.Session` (bundles; the benchmark)."""
    from kerasllm.export.runtime import flush_denormals  # noqa: PLC0415

    def run(ids, mask, names):
        with flush_denormals():
            return dict(zip(names, session.session.run(names, {"input_ids": ids, "attention_mask": mask})))

    run_tokens = CPU_RUN_TOKENS if session.device_type == "cpu" else None  # a GPU wants whole batches
    return _predictor_class(task)(task, model_task, tokenizer, config, labels, run, source, run_tokens, train)


def _modeldir(path: Path, task: str, device: str | None = None) -> EncoderPredictor:
    from kerasllm.modeldir import load_model_dir  # noqa: PLC0415 - imports TensorFlow

    model, tokenizer, run_config = load_model_dir(path, device)
    if run_config["model"]["family"] != "encoder":
        kind = run_config.get("task", run_config["model"]["family"])  # the task's name: 'a encoder' read badly
        raise UsageError(f"{path}: a {kind!r} model cannot {task} (needs an encoder)")

    def run(ids, mask, names):
        outputs = model.export_outputs(ids.astype("int32"), mask)
        return {name: np.asarray(outputs[name]) for name in names}

    return _predictor_class(task)(task, run_config["task"], tokenizer, run_config["model"],
                                  run_config.get("labels"), run, path, train=run_config.get("train"))


def load_classify_bundle(path: Path, device: str | None = None, **kwargs: Any) -> EncoderPredictor:
    return _bundle(path, "classify", device, kwargs.get("threads"))


def load_embed_bundle(path: Path, device: str | None = None, **kwargs: Any) -> EncoderPredictor:
    return _bundle(path, "embed", device, kwargs.get("threads"))


def load_classify_modeldir(path: Path, device: str | None = None, **kwargs: Any) -> EncoderPredictor:
    return _modeldir(path, "classify", device)


def load_embed_modeldir(path: Path, device: str | None = None, **kwargs: Any) -> EncoderPredictor:
    return _modeldir(path, "embed", device)


def load_tag_bundle(path: Path, device: str | None = None, **kwargs: Any) -> TagPredictor:
    return _bundle(path, "tag", device, kwargs.get("threads"))


def load_tag_modeldir(path: Path, device: str | None = None, **kwargs: Any) -> TagPredictor:
    return _modeldir(path, "tag", device)

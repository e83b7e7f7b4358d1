"""Apache Beam `RunInference` for kerasllm bundles: the same bundle on Dataflow, Flink or Spark.

A `ModelHandler` (Beam's interface for RunInference) that loads a bundle's predictor once
per worker and runs it on batches of texts with the very code of the batch CLI
(export/batch.py: token-budget batches, length bucketing, per-record errors), so a
pipeline's results equal `kerasllm generate|classify|embed|tag|translate`'s. It imports no
TensorFlow: a Beam worker needs only the serving dependencies and `apache-beam`
(`pip install "kerasllm[serve,beam]"`).

Elements are texts (str) or dicts holding the text under `text_field` (for `tag` also a list of
words, or a dict holding one under `tokens_field`, as `kerasllm tag --tokens-field`); wrap the handler in
Beam's `KeyedModelHandler` to carry ids through. Each `PredictionResult.inference` is the
predictor's result dict (`{"output": ...}`, `{"label": ..., "scores": ...}`,
`{"embedding": ...}`) or `{"error": message}` for an element that failed; a failed element
never fails the bundle of elements around it. Beam elements have no line numbers, so the
messages carry none.

Example:
>>> import apache_beam as beam  # doctest: +SKIP
>>> from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
>>> from kerasllm.export.beam import BundleModelHandler
>>> handler = KeyedModelHandler(BundleModelHandler("bundle/", "generate", {"max_new_tokens": 32}))
>>> with beam.Pipeline() as p:
...     (p | beam.Create([("1", "Once upon a time")]) | RunInference(handler)
...        | beam.MapTuple(lambda key, result: {"id": key, **result.inference}) | beam.Map(print))
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Iterable, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from kerasllm.errors import DataError
from kerasllm.export import batch
from kerasllm.export.predict import GENERATED_TOKENS, Predictor, RecordError, load_predictor

class BundleModelHandler(ModelHandler[Any, PredictionResult, Predictor]):
    """RunInference model handler for a kerasllm bundle (ONNX Runtime, no TensorFlow).

    Args:
        bundle: the bundle directory (a path every worker can read).
        task: "generate", "translate", "classify", "embed" or "tag".
        options: the predictor's options by name (`max_new_tokens`, ...: see
            `batch.TASK_DEFAULTS`); the CLI's defaults fill the rest.
        text_field: where the text is when elements are dicts.
        tokens_field: `tag`: where a list of words is when elements are dicts (one without it is
            read from `text_field`); an element may also be a list of words itself.
        device: "cpu", "cuda" or "cuda:N" on the worker.
        truncate: "error", "left" or "right" for texts longer than the model allows.
        batch_size: most elements per model call (also Beam's max batch size).
        max_batch_tokens: padded-token budget per model call.
        min_batch_size: Beam's minimum batch size before calling `run_inference`.
    """

    def __init__(self, bundle: str | Path, task: str, options: dict | None = None, text_field: str = "text",
                 device: str = "cpu", truncate: str = "error", batch_size: int = 32,
                 max_batch_tokens: int | None = 8192, min_batch_size: int = 1, tokens_field: str = "tokens"):
        super().__init__()
        if task not in batch.TASK_DEFAULTS:
            raise ValueError(f"unknown task {task!r} (choose from {', '.join(batch.TASK_DEFAULTS)})")
        self.bundle = str(bundle)
        self.task = task
        self._check_options(options or {})
        self.options = {**batch.TASK_DEFAULTS[task], **(options or {})}
        self.text_field = text_field
        self.tokens_field = tokens_field
        self.device = device
        self.truncate = truncate
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.min_batch_size = min_batch_size
        # Seeded sampling keys each batch (batch.batch_seed) by this copy's own random number and the
        # elements it has sent to the model, so that neither its successive calls nor the other
        # workers' copies (each unpickled with a count from 0) draw the same numbers again: a seed
        # makes every batch draw afresh, but Beam's bundling and workers make no run repeatable.
        self._elements_seen = 0
        self._copy_key = 0

    def load_model(self) -> Predictor:
        self._copy_key = secrets.randbits(63)  # per worker's copy (the handler is pickled to each)
        predictor = load_predictor(self.task, self.bundle, device=self.device)
        batch.require_truncate_support(predictor, self.truncate)
        return predictor

    def run_inference(self, batch_of_elements: Sequence[Any], model: Predictor,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        options = {**self.options, **(inference_args or {})}
        results: list[dict | None] = [None] * len(batch_of_elements)
        ids: dict[int, list[int]] = {}
        for position, element in enumerate(batch_of_elements):
            try:
                ids[position] = batch.check_text(model, self._text(element), self.truncate)
            except (DataError, RecordError) as err:
                results[position] = {"error": str(err)}
        extra = options.get("max_new_tokens", 0) if self.task in ("generate", "translate") else 0
        first, self._elements_seen = self._elements_seen, self._elements_seen + len(batch_of_elements)
        for chosen, batch_results in batch.predict_planned(model, ids, options, self.batch_size, self.max_batch_tokens,
                                                           bucket=True, extra_tokens=extra or 0,
                                                           keys={p: (self._copy_key, first + p) for p in ids}):
            for position, result in zip(chosen, batch_results):
                result.pop(GENERATED_TOKENS, None)  # accounting for the CLI's summary, not output
                results[position] = result
        return [PredictionResult(element, result, model_id=self.bundle)
                for element, result in zip(batch_of_elements, results)]

    def _text(self, element: Any) -> str | list[str]:
        if self.task == "tag":  # a list of words, itself or in a dict (else a text, split by the tagger)
            words = element.get(self.tokens_field) if isinstance(element, dict) else element
            if isinstance(words, (list, tuple)):
                if not all(isinstance(word, str) for word in words):
                    raise DataError(f"{self.tokens_field!r} is not a list of strings" if isinstance(element, dict)
                                    else "expected a text, a list of strings or a dict")
                return list(words)
        if isinstance(element, str):
            return element
        if isinstance(element, dict):
            value = element.get(self.text_field)
            if value is None:
                raise DataError(f"missing field {self.text_field!r} (fields: {', '.join(sorted(element)) or 'none'})")
            return value if isinstance(value, str) else str(value)
        raise DataError(f"expected a text or a dict, got {type(element).__name__}")

    def _check_options(self, options: dict) -> None:
        unknown = sorted(set(options) - set(batch.TASK_DEFAULTS[self.task]))
        if unknown:
            raise ValueError(f"{self.task}: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(batch.TASK_DEFAULTS[self.task]))})")

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        self._check_options(inference_args or {})

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Declared here rather than passed to ModelHandler.__init__, which older Beams lack.
        return {"min_batch_size": self.min_batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "kerasllm"

    def get_num_bytes(self, batch_of_elements: Sequence[Any]) -> int:
        return sum(len(self._safe_text(e).encode("utf-8")) for e in batch_of_elements)

    def _safe_text(self, element: Any) -> str:
        try:
            text = self._text(element)
        except DataError:
            return ""
        return text if isinstance(text, str) else " ".join(text)

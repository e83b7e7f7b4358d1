"""One interface for batch inference over any model source, bundle or model dir.

The batch CLI (`kerasllm generate|classify|embed|tag|translate`) only talks to a
`Predictor`; each family supplies its implementations. A bundle's predictor runs on
ONNX Runtime and must not import TensorFlow; a model directory's predictor runs the
Keras model (imports TensorFlow lazily), so the two can be compared on the same input.

A predictor takes a batch of texts and returns one result dict per text, in order:
    generate / translate: {"output": str}  or, with n-best, {"output": [str, ...], "scores": [float, ...]}
    classify:             {"label": str, "scores": {label: probability, ...}}
    embed:                {"embedding": [float, ...]}
    tag:                  {"tokens": [word, ...], "tags": [tag, ...], "scores": [float, ...]}
A text that cannot be processed raises `RecordError` from `check` (before batching),
so the CLI can write an error record for it and carry on with the others. `predict`
receives the decoding options by name (generate/translate: max_new_tokens, temperature,
top_k, top_p, repetition_penalty, stop, num_beams, n_best, seed; classify: top_k;
embed: normalize; tag: none); a `RecordError` it raises is pinned on one record by the batch
runner (export/batch.py), which retries the batch in halves.

A predictor may also offer `predict_batches(batches, **options) -> Iterator[list[dict]]`:
each batch's results, batch by batch in order, a RecordError raised at the turn of the
batch that caused it. The batch runner then hands it all of a window's batches at once, so
it can work on several at the same time (the seq2seq bundle decodes one whole batch per
core); closing the iterator stops its work.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Protocol, Sequence

from kerasllm.errors import BundleError, KerasLLMError, UsageError
from kerasllm.export.records import surrogate_problem


# Optional key in a generate/translate result: how many tokens were generated for it. The
# batch runner removes it from the output and reports generated tokens/s.
GENERATED_TOKENS = "_generated_tokens"


def trained_seq_len(train: dict[str, Any] | None) -> int | None:
    """The `--seq-len` of training from a model dir's or a bundle's `train` record (positions past
    it were never trained), or None when the source does not record it (older bundles)."""
    seq_len = (train or {}).get("seq_len")
    return seq_len if isinstance(seq_len, int) and seq_len > 0 else None


class RecordError(KerasLLMError):
    """One input record cannot be processed (the job goes on with the others)."""


TRUNCATE_MODES = ("error", "left", "right")


def check_text(text: Any, what: str = "text") -> str:
    """`text`, checked as `Predictor.check` takes it: UsageError naming the type of anything but a
    str (bytes, a number or a list had failed inside `check` as a TypeError or AttributeError of the
    tokenizer's), RecordError for a str holding half of a surrogate pair (a JSON request's `"\\udcff"`:
    the tokenizer had raised "TextInputSequence must be str"), in the words of the record reader's
    check, which the batch CLI applies to the same text (records._text)."""
    if not isinstance(text, str):
        raise UsageError(f"{what} must be a str, got {type(text).__name__}")
    problem = surrogate_problem(text)
    if problem is not None:
        raise RecordError(f"{what} holds {problem}")
    return text


def kept_end(truncate: str) -> str:
    """The end of a text `check(text, truncate)` keeps: "end" for `left` (its start is dropped), else
    "start". UsageError for a mode that is none of TRUNCATE_MODES ("middle" had silently meant "error")."""
    if truncate not in TRUNCATE_MODES:
        raise UsageError(f"truncate must be one of {', '.join(TRUNCATE_MODES)}, got {truncate!r}")
    return "end" if truncate == "left" else "start"


class Predictor(Protocol):
    task: str  # "generate", "classify", "embed", "tag" or "translate"

    def check(self, text: str, truncate: str = "error") -> list[int]:
        """Tokenize one text and return its ids; raise RecordError if it is empty.

        A text longer than the model allows raises RecordError under `truncate="error"`;
        `"left"` keeps its last tokens (drops the start), `"right"` keeps its first tokens.
        """

    def predict(self, batch: Sequence[list[int]], **options: Any) -> list[dict]:
        """Results for a batch of tokenized texts, in order."""


# task -> family module implementing `load(source_path, device=..., **kwargs) -> Predictor`
# for "bundle" and "modeldir" sources. Families register here as they gain support.
PREDICTORS: dict[tuple[str, str], str] = {
    ("generate", "bundle"): "kerasllm.export.decoding_predictor:load_bundle",
    ("generate", "modeldir"): "kerasllm.export.decoding_predictor:load_modeldir",
    ("classify", "bundle"): "kerasllm.export.encoder_predictor:load_classify_bundle",
    ("classify", "modeldir"): "kerasllm.export.encoder_predictor:load_classify_modeldir",
    ("embed", "bundle"): "kerasllm.export.encoder_predictor:load_embed_bundle",
    ("embed", "modeldir"): "kerasllm.export.encoder_predictor:load_embed_modeldir",
    ("tag", "bundle"): "kerasllm.export.encoder_predictor:load_tag_bundle",
    ("tag", "modeldir"): "kerasllm.export.encoder_predictor:load_tag_modeldir",
    ("translate", "bundle"): "kerasllm.export.translate_predictor:load_bundle",
    ("translate", "modeldir"): "kerasllm.export.translate_predictor:load_modeldir",
}


def source_kind(path: str | Path) -> str:
    """"bundle" (has manifest.json) or "modeldir" (has model.keras and config.json)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return "bundle"
    if (path / "config.json").is_file() and (path / "model.keras").is_file():
        return "modeldir"
    if not path.exists():
        raise UsageError(f"{path}: no such bundle or model directory")
    raise UsageError(f"{path}: neither a bundle (manifest.json) nor a model directory (model.keras + config.json)")


def source_task(path: str | Path) -> str:
    """The task recorded in a bundle's manifest or a model directory's config.json: a malformed file
    is the one line the other commands give, not a KeyError or JSONDecodeError traceback from
    `kerasllm evaluate`, which asks first."""
    path = Path(path)
    if source_kind(path) == "bundle":
        return _manifest_task(path / "manifest.json")
    return read_run_config(path)["task"]


def _manifest_task(file: Path) -> str:
    """The `task` of a bundle's manifest, with load_bundle's messages for a manifest that is not JSON,
    not an object, or has no task. Only the task: the rest is checked where the bundle loads, after
    the checks of the command's own options (`kerasllm evaluate` of a seq2seq model on a file
    without pairs is refused before the model loads)."""
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8
        raise BundleError(f"{file}: not valid JSON ({err})") from None
    except OSError as err:
        raise BundleError(f"{file}: cannot be read ({err.strerror or err})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{file}: expected a JSON object")
    if "task" not in manifest:
        raise BundleError(f"{file}: incomplete manifest, missing task")
    if not isinstance(manifest["task"], str):
        raise BundleError(f"{file}: task must be a string, got {json.dumps(manifest['task'])[:100]}")
    return manifest["task"]


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A model directory's DIR/config.json, as `kerasllm train` writes it: a JSON object with a string
    `task`, an object `model` (the family config; `config_from_dict` checks its fields where the model
    loads), and where present an object `train` and `labels` (`check_labels`).

    Here, with no TensorFlow, because the serving side reads it too (`source_task`); training.py's
    `read_run_config` is this one. A file that cannot be read is a UsageError, as it always was; a
    readable one of the wrong shape is one line naming it (exit 1), not a KeyError or
    AttributeError traceback wherever a key was first read.
    """
    file = Path(path) / "config.json"
    try:
        run = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise UsageError(f"{file}: cannot be read ({err})") from None
    if not isinstance(run, dict):
        raise KerasLLMError(f"{file}: expected a JSON object, got {_json_type(run)}")
    for key, kind, required in (("task", str, True), ("model", dict, True), ("train", dict, False)):
        if key not in run:
            if required:
                raise KerasLLMError(f"{file}: no {key!r} (not a config.json that kerasllm train wrote?)")
        elif not isinstance(run[key], kind):
            raise KerasLLMError(f"{file}: {key!r} must be {'a string' if kind is str else 'a JSON object'}, "
                                f"got {_json_type(run[key])}")
    if "labels" in run:
        check_labels(run["labels"], file)
    return run


def check_labels(labels: Any, where: str | Path) -> None:
    """Label (tag) names by output id: a list of distinct strings. A name given twice had passed,
    and `classify` then reported one output's probability under the other's name (the scores are
    a dict by name), and `tag` wrote tags that cannot be told apart."""
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise KerasLLMError(f"{where}: labels must be a list of label names, got {json.dumps(labels)[:100]}")
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise KerasLLMError(f"{where}: labels: {label!r} appears twice (each output needs its own name)")
        seen.add(label)


def _json_type(value: Any) -> str:
    """How JSON names the type of a parsed value (for messages)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")


def load_predictor(task: str, source: str | Path, **kwargs: Any) -> Predictor:
    """The predictor for `task` ("generate", ...) on `source` (bundle or model dir)."""
    kind = source_kind(source)
    target = PREDICTORS.get((task, kind))
    if target is None:
        raise UsageError(f"{source}: no {task} predictor for a {kind} of task {source_task(source)!r}")
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)(Path(source), **kwargs)

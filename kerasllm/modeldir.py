"""Load a trained model directory (`kerasllm train` output) on the Keras side."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from kerasllm.config import config_from_dict
from kerasllm.errors import KerasLLMError, UsageError
from kerasllm.tokenizers import TOKENIZER_FILE, TextTokenizer, check_vocabulary
from kerasllm.training import CONFIG_FILE, MODEL_FILE, read_run_config


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def load_model_dir(path: str | Path, device: str | None = None):
    """Return `(model, tokenizer, run_config)`; `run_config["model"]` is the family config dict.

    `device` as the batch commands take it: None/"auto" (TensorFlow's choice), "cpu", or
    "cuda[:N]", which needs TensorFlow to see GPU N (else one line, as a bundle's CUDA session
    that does not load).

    A model directory is an artifact like a bundle: each of its files may be damaged, edited or
    copied from another run. What does not load, or does not agree with config.json (the model's
    class for the task, its config, the tokenizer's ids), is one line naming the file, exit 1.
    Keras's safe_mode stays on: a model.keras carrying Python code is refused, never run."""
    path = Path(path)
    config_file, model_file = path / CONFIG_FILE, path / MODEL_FILE
    if not model_file.is_file():
        raise UsageError(f"{path}: not a finished model directory (no {MODEL_FILE})")
    run = read_run_config(path)
    try:
        config = config_from_dict(run["model"])
    except UsageError as err:  # its "config: ..." message, which had named no file
        raise KerasLLMError(f"{config_file}: model {err}") from None
    use_device(device)
    import keras  # noqa: PLC0415

    from kerasllm.models import CausalLM, Seq2SeqLM  # noqa: PLC0415 - registers the serializable classes
    from kerasllm.models.encoder import ENCODER_TASKS  # noqa: PLC0415

    task_classes = {"causal-lm": CausalLM, "seq2seq": Seq2SeqLM, **ENCODER_TASKS}
    if run["task"] not in task_classes:
        raise KerasLLMError(f"{config_file}: unknown task {run['task']!r} (choose from {', '.join(task_classes)})")
    broken = f"{model_file}: cannot be loaded"
    if not zipfile.is_zipfile(model_file):  # Keras would say "File not found" of it
        raise KerasLLMError(f"{broken}, corrupt or incomplete (not a whole .keras zip file)")
    try:
        model = keras.models.load_model(model_file, compile=False)  # safe_mode: Keras's default, on
    except UsageError as err:  # the model's config, refused by config_from_dict in its from_config
        raise KerasLLMError(f"{model_file}: model {err}") from None
    # TypeError: Keras's own for an unknown class or a layer that does not deserialize (wrapping a
    # safe_mode refusal, as a vocabulary file outside the archive), or a config of the wrong shape.
    except (ValueError, TypeError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise KerasLLMError(f"{broken}{keras_refusal(err)}") from None
    check_model(model, run["task"], task_classes[run["task"]], config, model_file, config_file)
    tokenizer = TextTokenizer.load(path)
    run["model"] = config.to_dict()
    check_vocabulary(tokenizer, config.vocab_size, path / TOKENIZER_FILE)
    return model, tokenizer, run


def check_model(model, task: str, expected: type, config, model_file: Path, config_file: Path) -> None:
    """Refuse a loaded `model` that is not what config.json describes: of class `expected` (the one
    for its `task`) with the config `config`. A model.keras copied from another run had loaded, then failed as an
    AttributeError or TypeError traceback in the first batch, or passed with a config.json whose
    vocabulary the model lacks (ids past its embedding, refused mid-job); the bundle side checks
    its graphs the same way (bundle.check_graph)."""
    if type(model) is not expected:
        raise KerasLLMError(f"{model_file} holds a {type(model).__name__}, but {config_file} describes a {task} "
                            f"model (a {expected.__name__}): a model.keras from another run?")
    saved, described = model.config.to_dict(), config.to_dict()
    differing = [key for key in dict.fromkeys([*described, *saved]) if saved.get(key) != described.get(key)]
    if differing:
        shown = ", ".join(f"{key} {described.get(key)!r} (model.keras: {saved.get(key)!r})" for key in differing[:3])
        raise KerasLLMError(f"{config_file}: its model config does not match {model_file}'s: {shown}"
                            f"{f' and {len(differing) - 3} more' if len(differing) > 3 else ''}")


def keras_refusal(err: BaseException) -> str:
    """The end of the one line for a model.keras that Keras would not load: its reason, whole.

    Keras wraps the failure of a nested object in TypeErrors ("could not be deserialized properly")
    that quote whole configs, so the innermost error is the reason. A safe_mode refusal is said as
    such: its text is long, and cut at 200 characters it had lost its point mid-sentence."""
    chain = [err]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    refusal = next((e for e in reversed(chain) if "safe_mode=False" in str(e)), None)  # wrappers quote it
    if refusal is not None and "Lambda" in str(refusal):
        # kerasllm's models have no Lambda layer: this file was not written by kerasllm train, and
        # so no advice here on running its code (Keras's own message says how, from Python).
        return (": it holds a Lambda layer (Python code), which Keras's safe mode refuses to run "
                "(kerasllm models have none)")
    innermost = refusal or chain[-1]
    text = re.split(r"\s*(?:Full object config:|config=)", str(innermost), maxsplit=1)[0]
    first = (text.strip().splitlines() or [""])[0]
    sentence = re.match(r".*?[.!?](?=\s|$)", first)
    reason = sentence.group(0) if sentence else first
    if len(reason) > 300:
        reason = reason[:300].rsplit(" ", 1)[0] + " ..."
    if refusal is not None:
        return f": Keras's safe mode refused it ({reason})"
    return f", corrupt or incomplete ({type(innermost).__name__}: {reason})"


def use_device(device: str | None) -> None:
    """Make TensorFlow run on `device` (see `load_model_dir`), before it places anything."""
    if device in (None, "", "auto"):  # TensorFlow's choice (and no import of ONNX Runtime, parse_device's module)
        return
    from kerasllm.export.runtime import parse_device  # noqa: PLC0415 - one reading of --device

    kind, index = parse_device(device)
    import tensorflow as tf  # noqa: PLC0415

    gpus = tf.config.list_physical_devices("GPU")
    wanted = [] if kind == "cpu" else gpus[index:index + 1]
    if kind == "cuda" and not wanted:
        raise KerasLLMError(f"device {device}: TensorFlow sees {len(gpus)} GPU(s) (no CUDA build or driver?)")
    if wanted == tf.config.get_visible_devices("GPU"):
        return
    try:
        tf.config.set_visible_devices(wanted, "GPU")
    except RuntimeError as err:  # TensorFlow's runtime has already started in this process
        raise KerasLLMError(f"device {device}: TensorFlow has already started on other devices ({err})") from None

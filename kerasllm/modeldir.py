"""Load a trained model directory (`kerasllm train` output) on the Keras side."""

from __future__ import annotations

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
    that does not load)."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        raise UsageError(f"{path}: not a finished model directory (no {MODEL_FILE})")
    run = read_run_config(path)
    use_device(device)
    import keras  # noqa: PLC0415

    import kerasllm.models  # noqa: F401,PLC0415 - registers the serializable classes

    broken = f"{path / MODEL_FILE}: cannot be loaded, corrupt or incomplete"
    if not zipfile.is_zipfile(path / MODEL_FILE):  # Keras would say "File not found" of it
        raise KerasLLMError(f"{broken} (not a whole .keras zip file)")
    try:
        model = keras.models.load_model(path / MODEL_FILE, compile=False)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise KerasLLMError(f"{broken} ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})") from None
    tokenizer = TextTokenizer.load(path)
    run["model"] = config_from_dict(run["model"]).to_dict()
    check_vocabulary(tokenizer, run["model"]["vocab_size"], path / TOKENIZER_FILE)
    return model, tokenizer, run


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

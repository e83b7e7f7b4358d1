"""kerasllm: train transformer language models in Keras, serve them with ONNX Runtime.

Importing `kerasllm` is cheap: the Keras-side names (`CausalLM`, ...) load TensorFlow
only when first used (PEP 562), so `kerasllm.export.runtime`, the tokenizers and the
configs work in a serving environment without TensorFlow.
"""

from __future__ import annotations

import importlib
import os

# Keras 3 must run on TensorFlow here; set it before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

from kerasllm.config import DecoderConfig, EncoderConfig, Seq2SeqConfig  # noqa: E402  (TF-free)

# name -> module that defines it (imported on first access)
_LAZY = {
    "CausalLM": "kerasllm.models",
    "Encoder": "kerasllm.models",
    "MaskedLM": "kerasllm.models",
    "Seq2SeqLM": "kerasllm.models",
    "TextClassifier": "kerasllm.models",
    "TokenClassifier": "kerasllm.models",
    "layers": "kerasllm.layers",
    "models": "kerasllm.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith(name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kerasllm' has no attribute {name!r}")


__all__ = ["CausalLM", "MaskedLM", "Seq2SeqLM", "TextClassifier", "TokenClassifier", "DecoderConfig", "EncoderConfig", "Seq2SeqConfig", "__version__"]

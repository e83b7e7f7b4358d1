"""kerasllm: train transformer language models in Keras, serve them with ONNX Runtime.

Importing `kerasllm` is cheap: the Keras-side names (`CausalLM`, ...) load TensorFlow
only when first used (PEP 562), so `kerasllm.export.runtime`, the tokenizers and the
configs work in a serving environment without TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

# Keras 3 must run on TensorFlow here; set it before anything imports keras. Keras reads an empty
# KERAS_BACKEND as unset (it then takes keras.json's backend), so an empty value is replaced too; a
# user's other value is kept, and `keras_backend_problem` names it where the Keras side is used.
if not os.environ.get("KERAS_BACKEND"):
    os.environ["KERAS_BACKEND"] = "tensorflow"

# ONNX Runtime (1.29 on) collects usage telemetry on Linux and macOS too: at its import it writes a
# device id under ~/.cache/Microsoft and starts an uploader that sends events over HTTPS, from every
# serving process (a batch job, a web server) and every export. kerasllm turns it off unless the user
# has chosen (ORT_DISABLE_TELEMETRY=0 keeps ORT's default): a library should not open connections or
# write to HOME unasked, and with a read-only HOME ORT printed a coloured warning on every command. ORT
# reads the variable when it is imported, hence here, before any kerasllm module imports it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

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
    "save_model_dir": "kerasllm.training",
}


def keras_backend_problem() -> str | None:
    """Why kerasllm's Keras side cannot run in this process (KERAS_BACKEND names another Keras
    backend: kerasllm's models, training and export are TensorFlow code), or None.

    Keras would import that backend's package and fail on it ("No module named 'jax'"), which
    reads as advice to install it; the serving side (`kerasllm.export`) never imports Keras and
    runs whatever the variable says.
    """
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow":
        return None
    return f"kerasllm needs Keras's TensorFlow backend; KERAS_BACKEND is {backend!r} (unset it or set it to tensorflow)"


def __getattr__(name: str):
    if name in _LAZY:
        problem = keras_backend_problem()
        if problem is not None:
            raise ImportError(problem)
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith(name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kerasllm' has no attribute {name!r}")


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    """Imports kerasllm's models once `keras` is imported, so that Keras finds their classes in a
    saved model: `import kerasllm, keras; keras.saving.load_model("lm.keras")` had failed ("Could
    not locate class 'CausalLM'") until some kerasllm model was touched, as the models register
    with Keras on import and load lazily (see the module docstring). A process that never imports
    keras (the serving side) never triggers it and stays TensorFlow-free.

    keras is often imported from inside a kerasllm module (`import kerasllm.layers`: its
    attention module imports keras), and the models cannot be imported while that module is
    half-built (they import it back). So this finder wraps the loader of keras and of every
    kerasllm module imported meanwhile, counts the imports in progress, and registers the models
    when the outermost one has finished with keras loaded.
    Written by hand: Python has no post-import hook.
    """

    def __init__(self):
        self._finding = False
        self._executing = 0  # imports of keras / kerasllm modules in progress
        self._keras_loaded = False

    def find_spec(self, name, path=None, target=None):
        # Also asked when something only looks keras up (TensorFlow's import does): the wrapper
        # acts only when a module is really executed.
        if self._finding or not (name == "keras" or name.startswith("kerasllm.")):
            return None
        self._finding = True  # the lookup below asks the other finders for the module's own spec
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CountingLoader(spec.loader, self)
        return spec

    def executed(self, module, ok: bool) -> None:
        """After a wrapped module ran: register once keras is loaded and nothing is half-built
        (not after a failed import: the finder stays for the next one)."""
        if module.__name__ == "keras" and ok:
            self._keras_loaded = True
        if not ok or self._executing or not self._keras_loaded:
            return
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            importlib.import_module("kerasllm.models")  # registers every model and layer
        except Exception as err:  # noqa: BLE001 - never make the user's import fail
            warnings.warn(f"kerasllm: its models could not be registered with Keras ({err})", stacklevel=3)


class _CountingLoader(importlib.abc.Loader):
    """A module's own loader, run inside `_RegisterWhenKerasLoads`' count of imports in progress."""

    def __init__(self, loader, finder: _RegisterWhenKerasLoads):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):  # the rest of the loader's API (`python -m kerasllm`: runpy's get_code)
        return getattr(self._loader, name)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self._loader
        if module.__name__ == "keras" and self._finder._executing and keras_backend_problem():
            # A kerasllm module imports keras (kerasllm.training, a recipe, ...): say what it needs
            # before Keras fails on the other backend's package ("No module named 'jax'"). A user's
            # own `import keras` is left to Keras.
            raise ImportError(keras_backend_problem())
        self._finder._executing += 1
        ok = False
        try:
            self._loader.exec_module(module)
            ok = True
        finally:
            self._finder._executing -= 1
            self._finder.executed(module, ok)


if "keras" in sys.modules:  # keras came first: register now (TensorFlow is loaded already)
    importlib.import_module("kerasllm.models")
elif not any(isinstance(finder, _RegisterWhenKerasLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenKerasLoads())


__all__ = ["CausalLM", "MaskedLM", "Seq2SeqLM", "TextClassifier", "TokenClassifier", "DecoderConfig", "EncoderConfig",
           "Seq2SeqConfig", "save_model_dir", "__version__"]

"""kerasllm.export: ONNX export (Keras side) and the ONNX Runtime serving side.

`kerasllm.export.runtime` and everything it imports never import TensorFlow.

Keras side (imports TensorFlow lazily):
    convert.py     GraphSpec (a graph's declared I/O and dynamic axes), trace_to_onnx, save_onnx
    optimize.py    ORT transformer fusions (+ kerasllm's cached-attention fusion), fp16
    validate.py    Keras vs ONNX Runtime checks raising ValidationError with the figure
    exporter.py    export_model_dir: convert -> optimize -> validate -> bundle, per family
Serving side (no TensorFlow):
    bundle.py      manifest, hashes, load_bundle (BundleError), genai_config
    runtime.py     create_session (CUDA only when it loads), DecoderSession (IO binding, KV cache)
    generate.py    greedy / sampling / beam search over a generic step function
    predict.py     the Predictor interface and registry used by the batch CLI
"""

import importlib

# The supported entry points for serving bundles from Python (README, "Serving from Python"). Imported on
# first access (PEP 562): `import kerasllm.export` stays cheap and TensorFlow-free (`kerasllm --help`'s path).
_SERVING = dict.fromkeys(("load_predictor", "Predictor", "RecordError", "GENERATED_TOKENS", "TRUNCATE_MODES"),
                         "kerasllm.export.predict")
# ... and the lower-level serving names the README points to: a bundle, one session.
_SERVING.update({"create_session": "kerasllm.export.runtime", "DecoderSession": "kerasllm.export.runtime",
                 "load_bundle": "kerasllm.export.bundle"})
__all__ = sorted(_SERVING)
# The export itself (the training side's: it needs onnx and TensorFlow, which a serving install has
# not), reachable here too but kept out of __all__, so that `from kerasllm.export import *` runs in a
# serving environment. (The Beam handler, which needs apache_beam: kerasllm.export.beam.)
_SERVING.update({"export_model_dir": "kerasllm.export.exporter", "ExportOptions": "kerasllm.export.exporter"})


def __getattr__(name: str):
    if name not in _SERVING:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SERVING[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

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

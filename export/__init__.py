"""kerasllm.export: ONNX export (Keras side) and the ONNX Runtime serving side.

`kerasllm.export.runtime` and everything it imports never import TensorFlow.
"""

"""Deployment: ONNX export, and ONNX Runtime / TensorRT backends with ClipModel's encode surface."""

"""Pick the runtime a task's spec asks for: TensorRT, ONNX Runtime, or none (PyTorch)."""

from __future__ import annotations

from clip_tao.deploy.runtime import DeployedEncoder
from clip_tao.errors import ConfigError


def open_deployed(onnx_file: str | None, trt_engine: str | None, section: str) -> DeployedEncoder | None:
    """The deployed backend named by ``<section>.onnx_file`` / ``<section>.trt_engine``, or ``None``."""
    if onnx_file and trt_engine:
        raise ConfigError(f"{section}.onnx_file and {section}.trt_engine are both set: choose one backend")
    if trt_engine:
        from clip_tao.deploy.trt_backend import TensorRTEncoder

        return TensorRTEncoder(trt_engine, key=f"{section}.trt_engine")
    if onnx_file:
        from clip_tao.deploy.ort_backend import OnnxRuntimeEncoder

        return OnnxRuntimeEncoder(onnx_file, key=f"{section}.onnx_file")
    return None

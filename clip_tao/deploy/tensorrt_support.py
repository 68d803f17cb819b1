"""TensorRT is optional (``pip install "clip-tao[trt]"``): import it only here, and say clearly when it is missing."""

from __future__ import annotations

from clip_tao.errors import NotAvailableError

CPU_ALTERNATIVE = (
    "the ONNX Runtime backend (evaluate.onnx_file / inference.onnx_file) runs the exported files on the CPU"
)


def import_tensorrt():
    """The ``tensorrt`` module, on a machine with a CUDA GPU; else one clear :class:`NotAvailableError`."""
    try:
        import tensorrt
    except ImportError:
        raise NotAvailableError(
            f'TensorRT is not installed: pip install "clip-tao[trt]" on a machine with an NVIDIA GPU; {CPU_ALTERNATIVE}'
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise NotAvailableError(f"TensorRT needs an NVIDIA GPU and none is visible; {CPU_ALTERNATIVE}")
    return tensorrt

"""Which device to run on, and which mixed precision it supports."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int, cudnn_benchmark: bool = False, cudnn_deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch (all devices) and set cuDNN's flags (``train.cudnn``)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.deterministic = cudnn_deterministic


def enable_fast_matmul(device: torch.device) -> None:
    """TF32 tensor cores for float32 matrix products and convolutions on CUDA (as Lightning and timm's
    trainers do): about 8x the float32 rate, with a 10-bit mantissa that contrastive training does not feel.
    Retrieval metrics switch it off around their own products (ranks must be exact)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def select_device(num_gpus: int, gpu_ids: list[int]) -> torch.device:
    """The first of ``gpu_ids`` when CUDA is available and ``num_gpus`` > 0, else the CPU."""
    if num_gpus > 0 and torch.cuda.is_available():
        index = gpu_ids[0] if gpu_ids else 0
        if index >= torch.cuda.device_count():
            from clip_tao.errors import ConfigError

            raise ConfigError(f"gpu_ids={gpu_ids}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    if num_gpus > 0:
        log.info("no CUDA device found: running on the CPU")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How to run forward passes: ``dtype`` for autocast (``None``: plain fp32) and whether to scale the loss."""

    name: str
    dtype: torch.dtype | None
    use_grad_scaler: bool

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``fp16``/``bf16``/``fp32`` as far as ``device`` supports them; a fallback is logged as a warning."""
    if requested == "fp32":
        return Precision("fp32", None, False)
    if device.type == "cuda":
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            log.warning("precision bf16 is not supported by this GPU: using fp16 with loss scaling")
            requested = "fp16"
        if requested == "fp16":
            return Precision("fp16", torch.float16, True)
        return Precision("bf16", torch.bfloat16, False)
    if requested == "fp16":
        # fp16 autocast on CPUs is slow or missing and needs no loss scaling elsewhere: fp32 is the safe answer.
        log.warning("precision fp16 needs a GPU: training in fp32 on the CPU (bf16 is also available on CPU)")
        return Precision("fp32", None, False)
    return Precision("bf16", torch.bfloat16, False)

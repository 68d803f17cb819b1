"""Value ranges of spec keys: numbers that parse but cannot be meant (``eps=-1``, ``betas=[2,3]``).

The types come from the schema; this table adds the bounds. Every float must be finite (``nan``/``inf`` would
silently poison training), every integer must fit a 64-bit machine word.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from clip_tao.errors import ConfigError

INT64 = 2**63 - 1
FLOAT32_MAX = 3.4e38  # the optimisers multiply float32 weights by the learning rate
MAX_BATCH = 1 << 20  # a million samples a batch: far above any device's memory

# key -> (low, high); ``low``/``high`` are inclusive, ``None`` means unbounded.
# A low bound written as ``(x,)`` is exclusive.
RANGES: dict[str, tuple[Any, Any]] = {
    "train.optim.vision_lr": (0.0, FLOAT32_MAX),
    "train.optim.text_lr": (0.0, FLOAT32_MAX),
    "train.optim.weight_decay": (0.0, None),
    "train.optim.eps": ((0.0,), None),
    "train.optim.betas": (0.0, 0.999999),
    "train.optim.warmup_steps": (0, None),
    "train.grad_clip_norm": ((0.0,), None),
    "train.num_gpus": (1, 1024),
    "train.num_nodes": (1, 1 << 16),
    "train.accumulate_grad_batches": (1, MAX_BATCH),
    "train.seed": (-1, None),
    "train.num_epochs": (1, None),
    "train.checkpoint_interval": (1, None),
    "train.validation_interval": (1, None),
    "train.compatible_positive_weight": (0.0, None),
    "train.triplet_loss_weight": (0.0, None),
    "train.triplet_margin": (0.0, None),
    "train.checkpointer.save_top_k": (1, None),
    "dataset.train.wds.samples_per_shard": (1, None),
    "dataset.val.wds.samples_per_shard": (1, None),
    "evaluate.num_gpus": (1, 1024),
    "inference.num_gpus": (1, 1024),
    "export.opset_version": (11, None),
    "export.input_channel": (1, None),
    "gen_trt_engine.gpu_id": (0, None),
    "gen_trt_engine.tensorrt.workspace_size": (0, None),
    "gen_trt_engine.tensorrt.min_batch_size": (1, MAX_BATCH),
    "gen_trt_engine.tensorrt.opt_batch_size": (1, MAX_BATCH),
    "gen_trt_engine.tensorrt.max_batch_size": (1, MAX_BATCH),
    "dataset.train.batch_size": (1, MAX_BATCH),
    "dataset.val.batch_size": (1, MAX_BATCH),
    "evaluate.batch_size": (1, MAX_BATCH),
    "inference.batch_size": (1, MAX_BATCH),
    "export.batch_size": (-1, MAX_BATCH),
    "gen_trt_engine.batch_size": (-1, MAX_BATCH),
    "dataset.train.num_workers": (0, 1024),
    "dataset.val.num_workers": (0, 1024),
    "evaluate.num_workers": (0, 1024),
    "inference.num_workers": (0, 1024),
    "inference.top_k": (1, MAX_BATCH),
    "dataset.augmentation.scale": ((0.0,), 1.0),
    "dataset.augmentation.color_jitter": (0.0, None),
    "dataset.augmentation.grayscale": (0.0, 1.0),
    "model.image_size": (1, 1 << 16),
    "export.input_height": (1, 1 << 16),
    "export.input_width": (1, 1 << 16),
}
LENGTHS = {"train.optim.betas": 2, "dataset.augmentation.scale": 2, "dataset.augmentation.color_jitter": 5}


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first value of ``cfg`` (a schema dataclass) out of its range."""
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        elif isinstance(value, list):
            if key in LENGTHS and len(value) != LENGTHS[key]:
                raise ConfigError(f"{key} must hold {LENGTHS[key]} numbers, got {len(value)}")
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_ranges(item, f"{key}[{i}].")
                else:
                    _check_value(key, f"{key}[{i}]", item)
        else:
            _check_value(key, key, value)


def _check_value(rule_key: str, shown: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{shown}={value} must be a finite number")
    if rule_key in RANGES:
        low, high = RANGES[rule_key]
        if isinstance(low, tuple) and value <= low[0]:
            raise ConfigError(f"{shown}={value} must be > {low[0]}")
        if low is not None and not isinstance(low, tuple) and value < low:
            raise ConfigError(f"{shown}={value} must be >= {low}")
        if high is not None and value > high:
            raise ConfigError(f"{shown}={_short(value)} must be <= {high}")
    if isinstance(value, int) and abs(value) > INT64:
        raise ConfigError(f"{shown} has {len(str(abs(value)))} digits: too large for any setting")


def _short(value: Any) -> str:
    """A number for a message: a 400-digit integer is shown by its size."""
    text = str(value)
    return text if len(text) <= 24 else f"<a {len(text)}-digit number>"

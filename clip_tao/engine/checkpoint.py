"""Checkpoints: plain tensors and Python data only, so ``torch.load(weights_only=True)`` reads them.

A training checkpoint holds ``model``, ``optimizer``, ``scheduler``, ``scaler`` state dicts, ``epoch``
(epochs completed), ``global_step``, ``batches_in_epoch`` and ``steps_in_epoch``, ``data_position`` (the data
layout and, for shards, where every sample stream stands: pass, shard, sample offset), ``world_size``, ``rng`` states
(one per rank when there are several), ``best``, ``model_type`` and ``config`` (the resolved spec as plain
data). Files are written atomically, by rank 0 only. Under FSDP a checkpoint is a folder that every rank writes
its shard into (:mod:`clip_tao.engine.sharded_checkpoint`); :func:`load_checkpoint` reads both.
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Any

import numpy as np
import torch

from clip_tao.engine.sharded_checkpoint import TRAIN_STATE, is_sharded_checkpoint, read_model_state, read_train_state
from clip_tao.errors import ModelError
from clip_tao.io.atomic import atomic_path

CHECKPOINT_FORMAT = 1


def checkpoint_name(epoch: int, step: int) -> str:
    """TAO's file name: ``model_epoch_{epoch:03d}_step_{step:05d}.pth``."""
    return f"model_epoch_{epoch:03d}_step_{step:05d}.pth"


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint safely (no arbitrary unpickling); a bad file gives one clear :class:`ModelError`.

    A sharded checkpoint folder gives its plain data with the whole model under ``model`` (read in this
    process; its optimiser pieces are left on disk).
    """
    if is_sharded_checkpoint(path):
        state = read_train_state(path) if os.path.isfile(os.path.join(path, TRAIN_STATE)) else {}
        state.pop("optimizer_param_groups", None)
        return {**state, "model": read_model_state(path)}
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        # RADIO's published checkpoints carry their training arguments as an argparse.Namespace:
        # allow exactly that class, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"checkpoint {path!r} cannot be read safely: {first}") from exc
    if not isinstance(checkpoint, dict):
        raise ModelError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a checkpoint or state dict")
    return checkpoint


def model_state_from(checkpoint: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The model weights of a clip-tao checkpoint, a Lightning-style ``state_dict`` or a bare state dict."""
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        return checkpoint["state_dict"]
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ModelError(f"checkpoint {path!r} holds no model weights (no 'model' or 'state_dict' entry)")


def check_model_type(checkpoint: dict[str, Any], current_type: str | None, path: str) -> None:
    """One line when a checkpoint was trained as another model type (before any tensor is compared)."""
    saved_type = checkpoint.get("model_type")
    if saved_type and current_type and saved_type != current_type:
        raise ModelError(
            f"checkpoint {path!r} was trained as model.type={saved_type}, but the spec says {current_type}: "
            f"set model.type={saved_type}"
        )


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain lists."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]

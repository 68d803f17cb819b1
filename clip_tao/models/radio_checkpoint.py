"""NVIDIA RADIO's two published checkpoint layouts, read into one :class:`RadioCheckpoint`.

- **torch.hub** (``c-radio_v3-h_half.pth.tar``, what ``hubconf.radio_model`` reads): a pickle of
  ``{args: argparse.Namespace, state_dict[, state_dict_ema]}`` with ``base_model.*`` (the backbone),
  ``input_conditioner.norm_mean/std``, ``_heads.<index|name>.*`` (summary heads, one per teacher),
  ``_feature_projections.*`` (spatial heads), ``_feature_normalizer.*``, ``summary_idxs``. Read with
  ``weights_only=True`` and nothing but ``argparse.Namespace`` allowed; EMA weights win, as in RADIO.
- **Hugging Face** (``nvidia/C-RADIOv3-*``, ``nvidia/C-RADIOv4-*``): ``config.json`` (``args``,
  ``adaptor_names``, ``adaptor_configs[name].head_idx``) + ``model.safetensors`` with ``radio_model.model.*``,
  ``radio_model.input_conditioner.*``, ``radio_model.adaptors.<name>.head_mlp|feat_mlp.*``.

Every tensor is sorted into what Radio-CLIP uses (backbone, input conditioner, summary heads) or a named,
deliberately unused group; nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from clip_tao.errors import ModelError

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"

# Tensors Radio-CLIP never runs, by what they are (RADIO uses them for dense features only).
_UNUSED_HUB = {
    "_feature_projections.": "spatial feature heads",
    "_feature_normalizer.": "dense feature normaliser",
    "_intermediate_feature_normalizer.": "intermediate feature normaliser",
    "summary_idxs": "summary index buffer (recomputed from args.teachers)",
}
_UNUSED_HF = {
    "radio_model.feature_normalizer.": "dense feature normaliser",
    "radio_model.inter_feature_normalizer.": "intermediate feature normaliser",
    "radio_model.summary_idxs": "summary index buffer (recomputed from args.teachers)",
}


@dataclass
class RadioCheckpoint:
    """A RADIO checkpoint, layout-independent. ``backbone`` keys are RADIO's own (``patch_generator.*``,
    ``blocks.*``, ``norm.*``), ``heads`` maps a teacher name to its summary head's tensors."""

    path: str
    layout: str  # "torch.hub" or "huggingface"
    args: dict[str, Any]
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    conditioner: tuple[tuple[float, ...], tuple[float, ...]] | None
    head_slots: dict[str, int] = field(default_factory=dict)  # recorded token slots (Hugging Face layout)
    unused: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys

    @property
    def teachers(self) -> list[dict]:
        return list(self.args.get("teachers") or [])

    def mark_unused(self, reason: str, keys: list[str]) -> None:
        if keys:
            self.unused.setdefault(reason, []).extend(keys)


def read_radio_checkpoint(path: str) -> RadioCheckpoint:
    """Either layout from ``path`` (a ``.pth.tar``, a Hugging Face folder, or its ``model.safetensors``)."""
    if not os.path.exists(path):
        raise ModelError(
            f"RADIO checkpoint {path!r} does not exist: give a c-radio .pth.tar file or a Hugging Face "
            "RADIO folder (config.json + model.safetensors)"
        )
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return _read_huggingface(folder, path if not os.path.isdir(path) else os.path.join(folder, HF_WEIGHTS))
    return _read_torch_hub(path)


# -- torch.hub ------------------------------------------------------------------------------------


def _read_torch_hub(path: str) -> RadioCheckpoint:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt, foreign or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"RADIO checkpoint {path!r} cannot be read safely ({first}): give RADIO's torch.hub .pth.tar or a "
            "Hugging Face RADIO folder"
        ) from exc
    return checkpoint_from_hub_dict(checkpoint, path)


def checkpoint_from_hub_dict(checkpoint: Any, path: str) -> RadioCheckpoint:
    """A loaded torch.hub checkpoint dict (``{args, state_dict[, state_dict_ema]}``) sorted into its parts."""
    if not isinstance(checkpoint, dict) or "args" not in checkpoint:
        raise ModelError(
            f"{path!r} is neither a RADIO torch.hub checkpoint (a dict with 'args' and 'state_dict') nor a "
            "Hugging Face RADIO folder (config.json + model.safetensors)"
        )
    state = checkpoint.get("state_dict_ema") or checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ModelError(f"RADIO checkpoint {path!r} has no 'state_dict': the file is incomplete")
    raw_args = checkpoint["args"]
    args = dict(vars(raw_args)) if isinstance(raw_args, argparse.Namespace) else dict(raw_args)
    # What timm's clean_state_dict strips (DDP / torch.compile wrappers), as RADIO's loader does.
    state = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}

    teachers = list(args.get("teachers") or [])
    # RADIO looks a head up at the FIRST index of a teacher name; later duplicates of a name are never read.
    first_index = {}
    for i, t in enumerate(teachers):
        first_index.setdefault(t["name"], i)
    by_index = {str(i): name for name, i in first_index.items()}
    duplicates = {str(i) for i, t in enumerate(teachers) if first_index[t["name"]] != i}
    names = {t["name"] for t in teachers}
    ckpt = RadioCheckpoint(path, "torch.hub", args, {}, {}, None)
    conditioner: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("base_model."):
            ckpt.backbone[key[len("base_model.") :]] = value
        elif key.startswith("input_conditioner."):
            conditioner[key[len("input_conditioner.") :]] = value
        elif key.startswith("_heads."):
            slot, _, rest = key[len("_heads.") :].partition(".")
            # RADIO keys heads by teacher index, some releases by teacher name.
            name = by_index.get(slot, slot if slot in names else None)
            if slot in duplicates:
                ckpt.mark_unused("heads of repeated teacher names (RADIO reads the first)", [key])
            elif name is None:
                unknown.append(key)
            else:
                ckpt.heads.setdefault(name, {})[rest] = value
        else:
            reason = next((r for p, r in _UNUSED_HUB.items() if key.startswith(p)), None)
            if reason is None:
                unknown.append(key)
            else:
                ckpt.mark_unused(reason, [key])
    ckpt.conditioner = _conditioner(conditioner, path)
    _note_unknown(ckpt, unknown)
    return ckpt


# -- Hugging Face ---------------------------------------------------------------------------------


def _read_huggingface(folder: str, weights: str) -> RadioCheckpoint:
    config_path = os.path.join(folder, HF_CONFIG)
    if not os.path.isfile(config_path) or not os.path.isfile(weights):
        raise ModelError(
            f"{folder!r} is not a Hugging Face RADIO folder: it needs {HF_CONFIG} and {HF_WEIGHTS} "
            "(`hf download nvidia/C-RADIOv3-H --local-dir <folder>`)"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise ModelError(f"{config_path!r} has no 'args': it is not a RADIO model's config.json")
    from safetensors.torch import load_file

    try:
        state = load_file(weights)
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise ModelError(f"{weights!r} is not a readable safetensors file: {exc}") from exc

    head_slots = {
        name: int(adaptor["head_idx"])
        for name, adaptor in (config.get("adaptor_configs") or {}).items()
        if isinstance(adaptor, dict) and "head_idx" in adaptor
    }
    return checkpoint_from_radio_model_state(state, dict(config["args"]), weights, head_slots, folder)


def checkpoint_from_radio_model_state(
    state: Mapping[str, torch.Tensor],
    args: dict[str, Any],
    where: str,
    head_slots: dict[str, int] | None = None,
    path: str | None = None,
) -> RadioCheckpoint:
    """A state dict of RADIO's ``RADIOModel`` under ``radio_model.`` (the Hugging Face layout, and what a
    module holding RADIO's hub model as ``radio_model`` saves) sorted into its parts."""
    ckpt = RadioCheckpoint(path or where, "huggingface", args, {}, {}, None, dict(head_slots or {}))
    conditioner: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("radio_model.model."):
            ckpt.backbone[key[len("radio_model.model.") :]] = value
        elif key.startswith("radio_model.input_conditioner."):
            conditioner[key[len("radio_model.input_conditioner.") :]] = value
        elif key.startswith("radio_model.adaptors."):
            name, _, rest = key[len("radio_model.adaptors.") :].partition(".")
            if rest.startswith("head_mlp."):
                ckpt.heads.setdefault(name, {})[rest[len("head_mlp.") :]] = value
            elif rest.startswith("feat_mlp."):
                ckpt.mark_unused("spatial feature heads", [key])
            else:
                unknown.append(key)
        else:
            reason = next((r for p, r in _UNUSED_HF.items() if key.startswith(p)), None)
            if reason is None:
                unknown.append(key)
            else:
                ckpt.mark_unused(reason, [key])
    ckpt.conditioner = _conditioner(conditioner, where)
    _note_unknown(ckpt, unknown)
    return ckpt


# -- shared ---------------------------------------------------------------------------------------


def _conditioner(tensors: Mapping[str, torch.Tensor], where: str):
    if not tensors:
        return None
    missing = sorted({"norm_mean", "norm_std"} - set(tensors))
    extra = sorted(set(tensors) - {"norm_mean", "norm_std"})
    if missing or extra:
        raise ModelError(
            f"{where!r}: the input conditioner lacks {['input_conditioner.' + k for k in missing]} and holds "
            f"unknown {extra}: RADIO's has norm_mean and norm_std; the file is incomplete"
        )
    return (
        tuple(float(v) for v in tensors["norm_mean"].flatten()),
        tuple(float(v) for v in tensors["norm_std"].flatten()),
    )


def _note_unknown(ckpt: RadioCheckpoint, keys: list[str]) -> None:
    # RADIO's own loader ignores tensors it does not know; name them instead of dropping them silently.
    if keys:
        ckpt.mark_unused("not part of RADIO's model", keys)
        log.warning(
            "RADIO checkpoint %s: %d tensors are not part of RADIO's model and are left out (e.g. %s)",
            ckpt.path,
            len(keys),
            sorted(keys)[:3],
        )


def arg(args: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """``args[name]``, with RADIO's default when the key is missing or None."""
    value = args.get(name, default)
    return default if value is None else value

"""open_clip ``CLIP`` models (OpenAI-style CLIP, NV-CLIP): ViT image tower + text transformer.

NV-CLIP's "SigLIP-CLIPA" architectures are not open_clip built-ins: their configs live in this package's
JSON files (sin-cos 2-d position embedding, logit bias initialised at -10, BERT-uncased tokenizer).
Weights are open_clip state dicts (``model.pretrained_path`` / ``train.pretrained_model_path``) or an
open_clip folder (``open_clip_config.json`` + weights + tokenizer files, as open_clip publishes to the hub).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import ClipModel, Preprocess, checked_image_size, preprocess_from_config, seeded_init
from clip_tao.models.family import BuildOptions, ModelInfo, register_family
from clip_tao.models.tokenizer import HfTokenizer, Tokenizer, build_tokenizer

OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's weight file names in a hub folder, in the order open_clip prefers them.
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pt")

log = logging.getLogger(__name__)


class OpenClipModel(ClipModel):
    """Wraps ``open_clip.model.CLIP``; its state dict keys stay open_clip's under ``model.``."""

    def __init__(self, model_type: str, clip: nn.Module, tokenizer: Tokenizer, preprocess: Preprocess):
        super().__init__()
        self.model_type = model_type
        self.model = clip
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        # Accept a bare open_clip state dict too (train.pretrained_model_path = an NV-CLIP checkpoint).
        self.register_load_state_dict_pre_hook(_accept_open_clip_keys)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=False)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=False)

    def vision_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.visual.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        # open_clip's CLIP keeps the text tower's pieces at top level beside ``visual``.
        for name, param in self.model.named_parameters():
            if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
                yield param

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:
        return self.model.logit_bias

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1]


@register_family("openclip")
def build_openclip(info: ModelInfo, options: BuildOptions) -> tuple[OpenClipModel, bool]:
    cfg = copy.deepcopy(info.config)
    folder = options.pretrained_path if options.pretrained_path and os.path.isdir(options.pretrained_path) else None
    if folder:  # an open_clip hub-style folder carries its own architecture
        cfg.update(_read_open_clip_folder_config(folder))
    vision_cfg = cfg["vision_cfg"]
    native = vision_cfg.get("image_size", info.image_size)
    native = native[0] if isinstance(native, (list, tuple)) else native
    image_size = checked_image_size(info.name, options.image_size, native, vision_cfg["patch_size"])
    vision_cfg["image_size"] = image_size
    tokenizer = _openclip_tokenizer(info, cfg, options)
    clip = build_openclip_module(cfg)
    model = OpenClipModel(info.name, clip, tokenizer, preprocess_from_config(cfg, image_size))
    loaded = False
    if options.pretrained_path:
        load_openclip_weights(clip, _weight_file(options.pretrained_path))
        loaded = True
    elif options.pretrained:
        log.warning(
            "%s: no weights given (%s): using a fixed random initialisation; set model.pretrained_path or "
            "train.pretrained_model_path to start from published weights",
            info.name,
            info.weights,
        )
    return model, loaded


def build_openclip_module(cfg: dict) -> nn.Module:
    """open_clip ``CLIP`` from a model config, seeded so a random initialisation is the same every time."""
    from open_clip.model import CLIP

    text_cfg = {k: v for k, v in cfg["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    # init_logit_bias makes open_clip create the bias parameter (both loss types need one to exist).
    with seeded_init():
        return CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=cfg["vision_cfg"],
            text_cfg=text_cfg,
            quick_gelu=cfg.get("quick_gelu", False),
            init_logit_bias=cfg.get("init_logit_bias", 0.0),
        )


def _openclip_tokenizer(info: ModelInfo, cfg: dict, options: BuildOptions) -> Tokenizer:
    kind = cfg["tokenizer"]
    context_length = cfg["text_cfg"].get("context_length", info.context_length)
    if kind != HfTokenizer.kind:
        return build_tokenizer(kind, context_length, options.canonicalize_text)
    source = options.tokenizer_path or cfg["tokenizer_id"]
    folder = options.pretrained_path
    if not options.tokenizer_path and folder and os.path.isdir(folder) and _has_tokenizer_files(folder):
        source = folder
    strip_sep = cfg.get("strip_sep_token", False)
    return HfTokenizer(source, context_length, options.canonicalize_text, strip_sep_token=strip_sep)


def _has_tokenizer_files(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.txt", "tokenizer.model"))


def _read_open_clip_folder_config(folder: str) -> dict:
    path = os.path.join(folder, OPEN_CLIP_CONFIG)
    if not os.path.isfile(path):
        raise ModelError(
            f"model.pretrained_path {folder!r} is a folder without {OPEN_CLIP_CONFIG}: give an open_clip weight "
            "file (.pt/.bin/.safetensors) or an open_clip hub folder"
        )
    with open(path, encoding="utf-8") as f:
        model_cfg = json.load(f).get("model_cfg", {})
    return {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}


def _weight_file(path: str) -> str:
    if not os.path.isdir(path):
        return path
    for name in OPEN_CLIP_WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ModelError(f"open_clip folder {path!r} holds no weights: expected one of {', '.join(OPEN_CLIP_WEIGHT_FILES)}")


def load_openclip_weights(clip: nn.Module, path: str) -> None:
    """Load an open_clip state dict (``.bin``/``.pt``/``.safetensors``, ``state_dict`` key or ``module.``)."""
    from open_clip.factory import load_checkpoint

    if not os.path.isfile(path):
        raise ModelError(f"model.pretrained_path {path!r} does not exist: give an open_clip weight file")
    if os.path.getsize(path) == 0:
        raise ModelError(f"model.pretrained_path {path!r} is an empty file: download it again")
    try:
        load_checkpoint(clip, path, strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"weights in {path!r} do not fit this architecture: {first}") from exc
    except Exception as exc:  # unpickling refusals, corrupt archives: torch and safetensors raise many types
        raise ModelError(f"weights in {path!r} cannot be read safely: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _accept_open_clip_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Rename a bare open_clip state dict (``visual.*``, optionally ``module.visual.*``) to ``model.*``."""
    own = f"{prefix}model."
    if any(k.startswith(own) for k in state_dict):
        return
    strip = f"{prefix}module."
    foreign = [k for k in state_dict if k.startswith(prefix)]
    if not any(k.removeprefix(strip).removeprefix(prefix).startswith("visual.") for k in foreign):
        return
    for key in foreign:
        bare = key.removeprefix(strip) if key.startswith(strip) else key[len(prefix) :]
        state_dict[own + bare] = state_dict.pop(key)

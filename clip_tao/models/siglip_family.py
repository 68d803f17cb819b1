"""transformers SigLIP models: ViT with attention-pool head + text transformer pooled at the last token.

The fixed-resolution SigLIP2 checkpoints (``google/siglip2-so400m-patch*-*``) are SigLIP-architecture
(``SiglipModel``) with a Gemma tokenizer; they load from a hub id (the HF cache serves them with
``HF_HUB_OFFLINE=1``) or from a local ``save_pretrained`` folder (``model.pretrained_path``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import ClipModel, Preprocess, checked_image_size, preprocess_from_config, seeded_init
from clip_tao.models.family import BuildOptions, ModelInfo, register_family
from clip_tao.models.hub_cli import download_command, prepare_hub
from clip_tao.models.tokenizer import HfTokenizer, Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

# Files a folder must hold to serve as a tokenizer (any one of them).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "tokenizer_config.json")


class SiglipClipModel(ClipModel):
    """Wraps ``transformers.SiglipModel``; its state dict keys stay transformers' under ``model.``."""

    def __init__(
        self,
        model_type: str,
        hf_model: nn.Module,
        tokenizer: Tokenizer,
        preprocess: Preprocess,
        interpolate_pos_encoding: bool = False,
    ):
        super().__init__()
        self.model_type = model_type
        self.model = hf_model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        # True when the image size differs from the size the position embeddings were trained at.
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.interpolate_pos_encoding:
            return self.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
        return self.model.vision_model(pixel_values=pixels).pooler_output

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model(input_ids=input_ids).pooler_output

    def vision_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.vision_model.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.text_model.parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_hf_grad_checkpointing(self.model, enable)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:
        return self.model.logit_bias

    @property
    def embed_dim(self) -> int:
        return self.model.config.vision_config.hidden_size


def set_hf_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
    action = "enable" if enable else "disable"
    method = getattr(model, f"activation_checkpointing_{action}", None)
    method = method or getattr(model, f"gradient_checkpointing_{action}")
    method()


@contextmanager
def quiet_hf_loading():
    """Hide transformers' per-key load report and progress bar (a text tower alone skips the image keys)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_siglip_module(info: ModelInfo, image_size: int | None = None) -> nn.Module:
    """A randomly initialised ``SiglipModel`` of the type's architecture (no download, no tokenizer)."""
    from transformers import SiglipConfig, SiglipModel

    vision = dict(info.config["vision_config"])
    vision["image_size"] = image_size or info.image_size
    return SiglipModel(SiglipConfig(text_config=info.config["text_config"], vision_config=vision))


@register_family("siglip")
def build_siglip(info: ModelInfo, options: BuildOptions) -> tuple[SiglipClipModel, bool]:
    cfg = info.config
    hf_id = cfg.get("hf_id")
    loaded = False
    if options.pretrained_path:
        hf_model = load_siglip_pretrained(options.pretrained_path, is_local=True)
        loaded = True
    elif options.pretrained and hf_id:
        hf_model = load_siglip_pretrained(hf_id, is_local=False)
        loaded = True
    else:
        hf_model = None
        if options.pretrained:
            log.warning("%s has no published weights: using a fixed random initialisation", info.name)

    patch_size = cfg["vision_config"]["patch_size"]
    native = hf_model.config.vision_config.image_size if hf_model is not None else info.image_size
    image_size = checked_image_size(info.name, options.image_size, native, patch_size)
    if hf_model is None:
        with seeded_init():
            hf_model = build_siglip_module(info, image_size)
        native = image_size
    canonicalize = options.canonicalize_text or cfg.get("canonicalize_text", False)
    tokenizer = _siglip_tokenizer(info, options, canonicalize)
    preprocess = preprocess_from_config(cfg, image_size)
    model = SiglipClipModel(info.name, hf_model, tokenizer, preprocess, interpolate_pos_encoding=image_size != native)
    return model, loaded


def _siglip_tokenizer(info: ModelInfo, options: BuildOptions, canonicalize: bool) -> Tokenizer:
    kind = info.config["tokenizer"]
    if kind != HfTokenizer.kind:
        return build_tokenizer(kind, info.context_length, canonicalize)
    return HfTokenizer(tokenizer_source(info, options), info.context_length, canonicalize)


def tokenizer_source(info: ModelInfo, options: BuildOptions) -> str:
    """Where a hub tokenizer comes from: ``model.tokenizer_path``, the weights folder, or the hub id."""
    if options.tokenizer_path:
        if not os.path.isdir(options.tokenizer_path):
            raise ModelError(
                f"model.tokenizer_path {options.tokenizer_path!r} is not a folder: give a tokenizer folder"
            )
        return options.tokenizer_path
    folder = options.pretrained_path
    if folder and os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        return folder
    return info.config.get("tokenizer_id") or info.config["hf_id"]


def check_weight_files(folder: str) -> None:
    """One line for an empty weight file in a ``save_pretrained`` folder (a failed or cut-short download)."""
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".bin")) and os.path.getsize(os.path.join(folder, name)) == 0:
            raise ModelError(f"cannot load SigLIP weights from {folder!r}: {name} is an empty file; download it again")


def load_siglip_pretrained(source: str, is_local: bool) -> nn.Module:
    """A SigLIP model from a ``save_pretrained`` folder or a hub id (served by the HF cache when offline)."""
    from transformers import SiglipModel

    if is_local and not os.path.isdir(source):
        raise ModelError(f"model.pretrained_path {source!r} is not a folder: give a SigLIP save_pretrained folder")
    if is_local:
        check_weight_files(source)
    else:
        prepare_hub()
    try:
        with quiet_hf_loading():
            return SiglipModel.from_pretrained(source, attn_implementation="sdpa")
    except Exception as exc:  # torch, safetensors and transformers raise many types for bad local files
        if not is_local and not isinstance(exc, (OSError, ValueError, KeyError)):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ModelError(f"cannot load SigLIP weights from {source!r}: {first}") from exc
        raise ModelError(
            f"weights {source!r} are not reachable ({first}): pre-fetch them with `{download_command(source)}` "
            "(then HF_HUB_OFFLINE=1 works) or set model.pretrained_path to a local save_pretrained folder"
        ) from exc

"""transformers SigLIP models: ViT with attention-pool head + text transformer pooled at the last token."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import ClipModel, Preprocess, checked_image_size, preprocess_from_config, seeded_init
from clip_tao.models.registry import BuildOptions, ModelInfo, register_family
from clip_tao.models.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)


class SiglipClipModel(ClipModel):
    """Wraps ``transformers.SiglipModel``; its state dict keys stay transformers' under ``model.``."""

    def __init__(self, model_type: str, hf_model: nn.Module, tokenizer: Tokenizer, preprocess: Preprocess):
        super().__init__()
        self.model_type = model_type
        self.model = hf_model
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels).pooler_output

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model(input_ids=input_ids).pooler_output

    def vision_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.vision_model.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.text_model.parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
        action = "enable" if enable else "disable"
        method = getattr(self.model, f"activation_checkpointing_{action}", None)
        method = method or getattr(self.model, f"gradient_checkpointing_{action}")
        method()

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:
        return self.model.logit_bias

    @property
    def embed_dim(self) -> int:
        return self.model.config.vision_config.hidden_size


@register_family("siglip")
def build_siglip(info: ModelInfo, options: BuildOptions) -> tuple[SiglipClipModel, bool]:
    from transformers import SiglipConfig, SiglipModel

    cfg = info.config
    vision = dict(cfg["vision_config"])
    image_size = checked_image_size(info.name, options.image_size, info.image_size, vision["patch_size"])
    vision["image_size"] = image_size
    tokenizer = build_tokenizer(cfg["tokenizer"], info.context_length, options.canonicalize_text)
    loaded = False
    if options.pretrained_path:
        hf_model = _load_pretrained(options.pretrained_path)
        loaded = True
    else:
        with seeded_init():
            hf_model = SiglipModel(SiglipConfig(text_config=cfg["text_config"], vision_config=vision))
        if options.pretrained:
            log.warning("%s has no published weights: using a fixed random initialisation", info.name)
    return SiglipClipModel(info.name, hf_model, tokenizer, preprocess_from_config(cfg, image_size)), loaded


def _load_pretrained(path: str) -> nn.Module:
    """A ``save_pretrained`` folder of a SigLIP model."""
    from transformers import SiglipModel

    if not os.path.isdir(path):
        raise ModelError(f"model.pretrained_path {path!r} is not a folder: give a SigLIP save_pretrained folder")
    try:
        return SiglipModel.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"cannot load SigLIP weights from {path!r}: {first}") from exc

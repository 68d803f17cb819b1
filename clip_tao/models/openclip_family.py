"""open_clip ``CLIP`` models (OpenAI-style CLIP, NV-CLIP): ViT image tower + text transformer."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import ClipModel, Preprocess, checked_image_size, preprocess_from_config, seeded_init
from clip_tao.models.registry import BuildOptions, ModelInfo, register_family
from clip_tao.models.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)


class OpenClipModel(ClipModel):
    """Wraps ``open_clip.model.CLIP``; its state dict keys stay open_clip's under ``model.``."""

    def __init__(self, model_type: str, clip: nn.Module, tokenizer: Tokenizer, preprocess: Preprocess):
        super().__init__()
        self.model_type = model_type
        self.model = clip
        self.tokenizer = tokenizer
        self.preprocess = preprocess

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
    from open_clip.model import CLIP

    cfg = copy.deepcopy(info.config)
    vision_cfg = cfg["vision_cfg"]
    image_size = checked_image_size(info.name, options.image_size, info.image_size, vision_cfg["patch_size"])
    vision_cfg["image_size"] = image_size
    tokenizer = build_tokenizer(cfg["tokenizer"], info.context_length, options.canonicalize_text)
    # init_logit_bias makes open_clip create the bias parameter (both loss types need one to exist).
    with seeded_init():
        clip = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=cfg["text_cfg"], init_logit_bias=0.0)
    model = OpenClipModel(info.name, clip, tokenizer, preprocess_from_config(cfg, image_size))
    loaded = False
    if options.pretrained_path:
        load_openclip_weights(clip, options.pretrained_path)
        loaded = True
    elif options.pretrained:
        log.warning("%s has no published weights: using a fixed random initialisation", info.name)
    return model, loaded


def load_openclip_weights(clip: nn.Module, path: str) -> None:
    """Load an open_clip state dict (``.bin``/``.pt``/``.safetensors``, ``state_dict`` key or ``module.``)."""
    import os

    from open_clip.factory import load_checkpoint

    if not os.path.isfile(path):
        raise ModelError(f"model.pretrained_path {path!r} does not exist: give an open_clip weight file")
    try:
        load_checkpoint(clip, path, strict=True)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"weights in {path!r} do not fit this architecture: {first}") from exc

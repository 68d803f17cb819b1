"""Any open_clip architecture as a model type, as TAO falls back to for names it does not list.

``model.type`` may be any name of ``open_clip.list_models()`` (``ViT-B-32``, ``ViT-B-16-SigLIP``,
``MobileCLIP2-S0`` ...). open_clip builds the model (``open_clip.create_model``). Weights, as open_clip's
``pretrained`` argument takes them: ``model.pretrained_path`` is a weight file/folder, or one of the
architecture's pretrained tags (``open_clip.list_pretrained_tags_by_model``, e.g. ``laion2b_s34b_b79k``,
fetched from the hub); without it the model is randomly initialised (TAO's fallback does the same).
The tokenizer is open_clip's BPE vocabulary (bundled) or the config's Hugging Face tokenizer.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import Preprocess, checked_image_size, seeded_init
from clip_tao.models.family import BuildOptions, ModelInfo, register_family
from clip_tao.models.openclip_family import OpenClipModel, _weight_file, load_openclip_weights
from clip_tao.models.tokenizer import HfTokenizer, OpenClipBpeTokenizer, Tokenizer

log = logging.getLogger(__name__)

FAMILY = "openclip-any"


def openclip_model_info(name: str) -> ModelInfo | None:
    """A :class:`ModelInfo` for an open_clip architecture name, or ``None`` when open_clip has no such name."""
    import open_clip

    if name not in open_clip.list_models():
        return None
    cfg = open_clip.get_model_config(name)
    size = cfg["vision_cfg"].get("image_size", 224)
    tags = open_clip.list_pretrained_tags_by_model(name)
    return ModelInfo(
        name=name,
        family=FAMILY,
        image_size=size[0] if isinstance(size, (list, tuple)) else int(size),
        embed_dim=int(cfg["embed_dim"]),
        context_length=int(cfg["text_cfg"].get("context_length", 77)),
        weights=f"open_clip tags: {', '.join(tags)}" if tags else "model.pretrained_path",
        description=f"open_clip architecture {name}",
        config=cfg,
    )


class AnyOpenClipModel(OpenClipModel):
    """``OpenClipModel`` for any open_clip model (``CLIP`` or ``CustomTextCLIP``)."""

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim) if hasattr(self.model.visual, "output_dim") else super().embed_dim


@register_family(FAMILY)
def build_any_openclip(info: ModelInfo, options: BuildOptions) -> tuple[AnyOpenClipModel, bool]:
    import open_clip

    source = options.pretrained_path
    tags = open_clip.list_pretrained_tags_by_model(info.name)
    tag = source if source and not os.path.exists(source) else None
    if tag is not None and tag not in tags:
        raise ModelError(
            f"model.pretrained_path {source!r} is neither an existing file nor an open_clip pretrained tag of "
            f"{info.name} (its tags: {', '.join(tags) or 'none'})"
        )
    patch = info.config["vision_cfg"].get("patch_size", 1)
    image_size = checked_image_size(info.name, options.image_size, info.image_size, patch)
    extra = {"force_image_size": image_size} if image_size != info.image_size else {}
    try:
        with seeded_init():
            clip = open_clip.create_model(info.name, pretrained=tag, **extra)
    except Exception as exc:  # hub and construction errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"open_clip could not build {info.name} (pretrained={tag!r}): {first}") from exc
    if source and tag is None:
        load_openclip_weights(clip, _weight_file(source))
    if getattr(clip, "logit_bias", None) is None:
        # Both losses need a bias parameter to exist (the softmax loss keeps it frozen at 0).
        clip.logit_bias = nn.Parameter(torch.zeros(()))
    tokenizer = _tokenizer(info, options)
    pre = getattr(clip.visual, "preprocess_cfg", {}) or {}
    preprocess = Preprocess(
        image_size=image_size,
        mean=tuple(pre.get("mean", Preprocess.__dataclass_fields__["mean"].default)),
        std=tuple(pre.get("std", Preprocess.__dataclass_fields__["std"].default)),
        interpolation=pre.get("interpolation", "bicubic"),
        resize_mode=pre.get("resize_mode", "shortest"),
    )
    if not source and options.pretrained:
        log.warning(
            "%s: no weights given: random initialisation (set model.pretrained_path to a file or tag)", info.name
        )
    return AnyOpenClipModel(info.name, clip, tokenizer, preprocess), bool(source)


def _tokenizer(info: ModelInfo, options: BuildOptions) -> Tokenizer:
    text_cfg = info.config["text_cfg"]
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return OpenClipBpeTokenizer(info.context_length, options.canonicalize_text)
    canonical = options.canonicalize_text or (text_cfg.get("tokenizer_kwargs") or {}).get("clean") == "canonicalize"
    return HfTokenizer(options.tokenizer_path or hf_name, info.context_length, canonical)

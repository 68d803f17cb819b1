"""SigLIP2 NaFlex: transformers ``Siglip2Model``, images at their own aspect ratio as patch sequences.

NaFlex keeps an image's aspect ratio: it is resized to the largest ``rows x cols`` grid of 16-px patches
that fits ``max_num_patches`` (``model.max_num_patches``, 256 by default as in the model's processor),
its patches are flattened and padded to the batch's longest sequence, and the grid shape tells the model
how to resize its position embeddings (see :mod:`clip_tao.models.patches`). ``encode_image`` takes that
:class:`~clip_tao.models.patches.PatchBatch`, or a plain ``[B, 3, H, W]`` batch of one size (H and W
multiples of the patch).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import Preprocess, checked_image_size, preprocess_from_config, seeded_init
from clip_tao.models.family import BuildOptions, ModelInfo, register_family
from clip_tao.models.hub_cli import download_command, prepare_hub
from clip_tao.models.patches import PatchBatch, check_max_num_patches, image_to_patch_sequence
from clip_tao.models.siglip_family import SiglipClipModel, _siglip_tokenizer, quiet_hf_loading
from clip_tao.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_NUM_PATCHES = 256  # Siglip2ImageProcessor's default


class NaFlexClipModel(SiglipClipModel):
    """Wraps ``transformers.Siglip2Model``; its state dict keys stay transformers' under ``model.``.

    Text tower, logit parameters and checkpointing are SigLIP's; only the image input differs.
    """

    def __init__(self, model_type: str, hf_model: nn.Module, tokenizer: Tokenizer, preprocess: Preprocess):
        super().__init__(model_type, hf_model, tokenizer, preprocess)
        self.patch_size = preprocess.patch_size
        self.max_num_patches = preprocess.max_num_patches

    def patch_inputs(self, pixels: torch.Tensor | PatchBatch) -> PatchBatch:
        """A :class:`PatchBatch` as is; a ``[B, 3, H, W]`` batch cut into its ``H/p x W/p`` patches."""
        if isinstance(pixels, PatchBatch):
            return pixels
        p = self.patch_size
        batch, _, height, width = pixels.shape
        if height % p or width % p:
            raise ModelError(f"{self.model_type} needs image sizes that are multiples of {p}; got {height}x{width}")
        values = torch.stack([image_to_patch_sequence(image, p) for image in pixels])
        mask = torch.ones(values.shape[:2], dtype=torch.int32, device=pixels.device)
        shapes = torch.tensor([[height // p, width // p]] * batch, dtype=torch.long, device=pixels.device)
        return PatchBatch(values, mask, shapes)

    def image_features(self, pixels: torch.Tensor | PatchBatch) -> torch.Tensor:
        batch = self.patch_inputs(pixels)
        return self.patch_features(batch.pixel_values, batch.pixel_attention_mask, batch.spatial_shapes)

    def patch_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """``Siglip2Model``'s image tower on its own inputs -> ``[B, D]`` un-normalised."""
        out = self.model.vision_model(
            pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes
        )
        return out.pooler_output

    def encode_image(self, pixels: torch.Tensor | PatchBatch) -> torch.Tensor:
        """:class:`PatchBatch` (or ``[B,3,H,W]``) -> ``[B, D]`` L2-normalised."""
        return F.normalize(self.image_features(pixels), dim=-1)


def build_naflex_module(info: ModelInfo) -> nn.Module:
    """A randomly initialised ``Siglip2Model`` of the type's architecture (no download, no tokenizer)."""
    from transformers import Siglip2Config, Siglip2Model

    return Siglip2Model(
        Siglip2Config(text_config=info.config["text_config"], vision_config=info.config["vision_config"])
    )


def load_naflex_pretrained(source: str, is_local: bool) -> nn.Module:
    from transformers import Siglip2Model

    if not is_local:
        prepare_hub()
    try:
        with quiet_hf_loading():
            return Siglip2Model.from_pretrained(source, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ModelError(f"cannot load SigLIP2 NaFlex weights from {source!r}: {first}") from exc
        raise ModelError(
            f"weights {source!r} are not reachable ({first}): pre-fetch them with `{download_command(source)}` "
            "(then HF_HUB_OFFLINE=1 works) or set model.pretrained_path to a local save_pretrained folder"
        ) from exc


@register_family("siglip2-naflex")
def build_naflex(info: ModelInfo, options: BuildOptions) -> tuple[NaFlexClipModel, bool]:
    import os

    cfg = info.config
    if options.pretrained_path:
        if not os.path.isdir(options.pretrained_path):
            raise ModelError(
                f"model.pretrained_path {options.pretrained_path!r} is not a folder: give a Siglip2 save_pretrained folder"
            )
        hf_model = load_naflex_pretrained(options.pretrained_path, is_local=True)
    elif options.pretrained and cfg.get("hf_id"):
        hf_model = load_naflex_pretrained(cfg["hf_id"], is_local=False)
    else:
        if options.pretrained:
            log.warning("%s has no published weights: using a fixed random initialisation", info.name)
        with seeded_init():
            hf_model = build_naflex_module(info)
    loaded = bool(options.pretrained_path) or (options.pretrained and bool(cfg.get("hf_id")))
    vision = hf_model.config.vision_config
    # image_size is only the square of a plain [B, 3, H, W] batch (benchmarks); the data keeps aspect ratios.
    image_size = checked_image_size(info.name, options.image_size, info.image_size, vision.patch_size)
    budget = DEFAULT_MAX_NUM_PATCHES if options.max_num_patches is None else options.max_num_patches
    check_max_num_patches(budget, vision.num_patches)
    canonicalize = options.canonicalize_text or cfg.get("canonicalize_text", False)
    preprocess = dataclasses.replace(
        preprocess_from_config(cfg, image_size), patch_size=vision.patch_size, max_num_patches=budget
    )
    tokenizer = _siglip_tokenizer(info, options, canonicalize)
    return NaFlexClipModel(info.name, hf_model, tokenizer, preprocess), loaded

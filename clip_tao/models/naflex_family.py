"""SigLIP2 NaFlex: transformers ``Siglip2Model``, images as variable-length patch sequences.

NaFlex keeps an image's aspect ratio: the image is cut into a ``rows x cols`` grid of 16-px patches,
the patches are flattened (``pixel_values [B, N, p*p*3]``), padded to the longest sequence of the batch
(``pixel_attention_mask [B, N]``), and the grid shape (``spatial_shapes [B, 2]``) tells the model how
to resize its position embeddings. ``encode_image`` takes the usual ``[B, 3, H, W]`` batch; images
smaller than the batch's canvas give their real size in ``image_sizes [B, 2]`` (height, width, top-left
aligned) and only their own patches are attended to. Not exportable (the ONNX graph has fixed inputs).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import Preprocess, checked_image_size, preprocess_from_config, seeded_init
from clip_tao.models.registry import BuildOptions, ModelInfo, register_family
from clip_tao.models.siglip_family import SiglipClipModel, quiet_hf_loading, tokenizer_source
from clip_tao.models.tokenizer import HfTokenizer, Tokenizer

log = logging.getLogger(__name__)


def image_to_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, rows*cols, p*p*C]``, patches row-major, each (y, x, channel) as NaFlex's processor."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch, rows * cols, patch_size * patch_size * channels)


def naflex_image_size(height: int, width: int, patch_size: int = 16, max_num_patches: int = 256) -> tuple[int, int]:
    """The size NaFlex's processor resizes an image to: aspect kept, multiples of the patch, at most N patches."""
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    return get_image_size_for_max_num_patches(height, width, patch_size, max_num_patches)


def pad_to_canvas(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes -> ``([B, 3, H_max, W_max]`` zero-padded at the bottom/right, ``image_sizes [B, 2])``.

    What a data loader's collate gives :meth:`NaFlexClipModel.encode_image` for variable-resolution batches.
    """
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    canvas = torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1])) for image in images])
    sizes = torch.tensor([[image.shape[1], image.shape[2]] for image in images], dtype=torch.long)
    return canvas, sizes


class NaFlexClipModel(SiglipClipModel):
    """Wraps ``transformers.Siglip2Model``; its state dict keys stay transformers' under ``model.``.

    Text tower, logit parameters and checkpointing are SigLIP's; only the image input differs.
    """

    exportable = False

    def __init__(self, model_type: str, hf_model: nn.Module, tokenizer: Tokenizer, preprocess: Preprocess):
        super().__init__(model_type, hf_model, tokenizer, preprocess)
        self.patch_size = hf_model.config.vision_config.patch_size
        # The patch budget of NaFlex's processor, for data pipelines that resize with naflex_image_size().
        self.max_num_patches = hf_model.config.vision_config.num_patches

    def naflex_inputs(
        self, pixels: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pixel_values [B,N,p*p*3], pixel_attention_mask [B,N], spatial_shapes [B,2])`` for ``Siglip2Model``."""
        p = self.patch_size
        batch, _, height, width = pixels.shape
        if image_sizes is None:
            if height % p or width % p:
                raise ModelError(f"{self.model_type} needs image sizes that are multiples of {p}; got {height}x{width}")
            patches = image_to_patches(pixels, p)
            mask = torch.ones(patches.shape[:2], dtype=torch.long, device=pixels.device)
            shapes = torch.tensor([[height // p, width // p]] * batch, device=pixels.device)
            return patches, mask, shapes
        grids = (image_sizes.to(torch.long) // p).tolist()
        sequences = [image_to_patches(pixels[i : i + 1, :, : r * p, : c * p], p)[0] for i, (r, c) in enumerate(grids)]
        longest = max(s.shape[0] for s in sequences)
        patches = torch.stack([F.pad(s, (0, 0, 0, longest - s.shape[0])) for s in sequences])
        mask = torch.zeros(batch, longest, dtype=torch.long, device=pixels.device)
        for i, sequence in enumerate(sequences):
            mask[i, : sequence.shape[0]] = 1
        return patches, mask, torch.tensor(grids, device=pixels.device)

    def image_features(self, pixels: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        values, mask, shapes = self.naflex_inputs(pixels, image_sizes)
        out = self.model.vision_model(pixel_values=values, pixel_attention_mask=mask, spatial_shapes=shapes)
        return out.pooler_output

    def encode_image(self, pixels: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """``[B,3,H,W]`` (padded) + optional ``image_sizes [B,2]`` -> ``[B, D]`` L2-normalised."""
        return F.normalize(self.image_features(pixels, image_sizes), dim=-1)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels, image_sizes), self.encode_text(input_ids)


def build_naflex_module(info: ModelInfo) -> nn.Module:
    """A randomly initialised ``Siglip2Model`` of the type's architecture (no download, no tokenizer)."""
    from transformers import Siglip2Config, Siglip2Model

    return Siglip2Model(
        Siglip2Config(text_config=info.config["text_config"], vision_config=info.config["vision_config"])
    )


def load_naflex_pretrained(source: str, is_local: bool) -> nn.Module:
    from transformers import Siglip2Model

    try:
        with quiet_hf_loading():
            return Siglip2Model.from_pretrained(source, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ModelError(f"cannot load SigLIP2 NaFlex weights from {source!r}: {first}") from exc
        raise ModelError(
            f"weights {source!r} are not reachable ({first}): pre-fetch them with `huggingface-cli download {source}` "
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
    elif options.pretrained:
        hf_model = load_naflex_pretrained(cfg["hf_id"], is_local=False)
    else:
        with seeded_init():
            hf_model = build_naflex_module(info)
    loaded = bool(options.pretrained_path) or options.pretrained
    # The image size is the square the fixed-size data pipeline produces; NaFlex itself takes any grid.
    image_size = checked_image_size(
        info.name, options.image_size, info.image_size, hf_model.config.vision_config.patch_size
    )
    canonicalize = options.canonicalize_text or cfg.get("canonicalize_text", False)
    tokenizer = HfTokenizer(tokenizer_source(info, options), info.context_length, canonicalize)
    return NaFlexClipModel(info.name, hf_model, tokenizer, preprocess_from_config(cfg, image_size)), loaded

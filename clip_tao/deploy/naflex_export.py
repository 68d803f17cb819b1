"""ONNX graphs of SigLIP2 NaFlex: the image tower takes the patch sequence, not a fixed-size image.

Inputs ``pixel_values [B, P, p*p*3]`` float32, ``pixel_attention_mask [B, P]`` int32 and ``spatial_shapes
[B, 2]`` int64 (what :class:`~clip_tao.models.patches.PatchBatch` and transformers' processor give), with
both the batch ``B`` and the patch count ``P`` dynamic. The position-embedding resize of transformers 5 is
plain tensor arithmetic and exports as it is; the attention-pooling head (``nn.MultiheadAttention``) bakes
the traced sequence length into its reshapes, so while exporting it is computed by :func:`pooling_head`
from the same weights. Verification runs the real ``Siglip2Model`` forward, so the ONNX file is compared
with transformers' own head, on inputs of another batch size and patch count than the traced ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_tao.deploy.encoder_graphs import ENCODER_SPECS, IMAGE_BATCH, EncoderSpec, TextEncoder
from clip_tao.models.base import ClipModel
from clip_tao.models.patches import PatchBatch, naflex_image_size, patch_batch

PATCH_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
NUM_PATCHES = "num_patches"
# Source shapes (height, width) the example inputs are cut from: portrait, landscape, a strip, a square.
_EXAMPLE_SHAPES = [(480, 200), (300, 640), (64, 700), (256, 256), (90, 120)]


def pooling_head(head: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Siglip2's attention-pooling head (one learned probe attends over the real patches), written with
    shapes taken from the tensors so the ONNX graph keeps ``P`` dynamic. ``[B, P, D]`` -> ``[B, D]``."""
    attention = head.attention
    batch, length, dim = hidden.shape
    heads = attention.num_heads
    head_dim = dim // heads
    wq, wk, wv = attention.in_proj_weight.chunk(3)
    bq, bk, bv = attention.in_proj_bias.chunk(3)
    query = F.linear(head.probe, wq, bq).reshape(1, 1, heads, head_dim).transpose(1, 2)
    key = F.linear(hidden, wk, bk).reshape(batch, length, heads, head_dim).transpose(1, 2)
    value = F.linear(hidden, wv, bv).reshape(batch, length, heads, head_dim).transpose(1, 2)
    scores = (query * head_dim**-0.5) @ key.transpose(-1, -2)  # [B, heads, 1, P]
    scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    pooled = attention.out_proj((scores.softmax(-1) @ value).transpose(1, 2).reshape(batch, 1, dim))
    pooled = pooled + head.mlp(head.layernorm(pooled))
    return pooled[:, 0]


def traceable_image_features(model: ClipModel, values: torch.Tensor, mask: torch.Tensor, shapes: torch.Tensor):
    """The NaFlex image tower with :func:`pooling_head` in place of ``nn.MultiheadAttention``."""
    from transformers.masking_utils import create_bidirectional_mask

    vision = model.model.vision_model
    hidden = vision.embeddings(values, shapes)
    encoder_mask = create_bidirectional_mask(config=vision.config, inputs_embeds=hidden, attention_mask=mask)
    hidden = vision.post_layernorm(vision.encoder(inputs_embeds=hidden, attention_mask=encoder_mask).last_hidden_state)
    return pooling_head(vision.head, hidden, mask)


def encode_patches(model: ClipModel, values: torch.Tensor, mask: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` L2-normalised: the traceable tower while exporting, transformers' forward otherwise."""
    if torch.onnx.is_in_onnx_export():
        return F.normalize(traceable_image_features(model, values, mask, shapes), dim=-1)
    return model.encode_image(PatchBatch(values, mask, shapes))


class NaFlexVisionEncoder(nn.Module):
    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor):
        return encode_patches(self.model, pixel_values, pixel_attention_mask, spatial_shapes)


class NaFlexCombinedEncoder(nn.Module):
    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_attention_mask, spatial_shapes, input_ids, attention_mask):
        return (
            encode_patches(self.model, pixel_values, pixel_attention_mask, spatial_shapes),
            *TextEncoder(self.model)(input_ids, attention_mask),
        )


def naflex_encoder_specs() -> dict:
    """``combined`` / ``vision`` / ``text`` as :data:`~clip_tao.deploy.encoder_graphs.ENCODER_SPECS`, with the
    patch inputs and their dynamic patch axis."""
    axes = {"pixel_values": {0: IMAGE_BATCH, 1: NUM_PATCHES}, "pixel_attention_mask": {0: IMAGE_BATCH, 1: NUM_PATCHES},
            "spatial_shapes": {0: IMAGE_BATCH}}  # fmt: skip
    text = ENCODER_SPECS["text"]
    return {
        "combined": EncoderSpec(
            NaFlexCombinedEncoder,
            (*PATCH_INPUTS, *text.inputs),
            ("image_embedding", *text.outputs),
            axes,
        ),
        "vision": EncoderSpec(NaFlexVisionEncoder, PATCH_INPUTS, ("image_embedding",), axes),
        "text": text,
    }


def example_patch_batch(model: ClipModel, batch: int, budget: int, seed: int = 0) -> PatchBatch:
    """``batch`` random images of mixed aspect ratios at ``budget`` patches, padded to the longest."""
    p = model.preprocess
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(batch):
        height, width = naflex_image_size(*_EXAMPLE_SHAPES[(i + seed) % len(_EXAMPLE_SHAPES)], p.patch_size, budget)
        images.append(torch.randn(3, height, width, generator=generator))
    return patch_batch(images, p.patch_size)


def naflex_example_inputs(
    model: ClipModel, batch: int, dynamic_batch: bool, device: torch.device, base: dict
) -> list[dict]:
    """Trace inputs (``batch`` images at the model's budget) and a second set for verification with another
    patch count (half the budget) and, when the batch is dynamic, another batch size."""
    trace = example_patch_batch(model, batch, model.preprocess.max_num_patches)
    other_batch = batch + 1 if dynamic_batch else batch
    other = example_patch_batch(model, other_batch, max(1, model.preprocess.max_num_patches // 2), seed=1)
    sets = []
    for patches in (trace, other):
        inputs = dict(zip(PATCH_INPUTS, (t.to(device) for t in patches.tensors())))
        sets.append({**base, **inputs})
    return sets

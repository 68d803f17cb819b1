"""The PyTorch modules that ONNX export traces, and the names of their inputs, outputs and dynamic axes.

Kept apart from :mod:`clip_tao.deploy.onnx_export` (which writes and verifies the files) so that the NaFlex
graphs in :mod:`clip_tao.deploy.naflex_export` can build on the text graph without importing the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clip_tao.models.base import ClipModel

# Dynamic axes get their own names: an image batch and a text batch need not be the same size.
IMAGE_BATCH, TEXT_BATCH = "image_batch", "text_batch"


def _anchor(tensor: torch.Tensor) -> torch.Tensor:
    """A zero that depends on ``tensor``: keeps an otherwise unused input in the graph, and gives
    parameter outputs (logit scale/bias) a node of their own so the exporter keeps their names."""
    return (tensor.reshape(tensor.shape[0], -1)[:1, :1].sum() * 0).to(torch.float32)


class CombinedEncoder(nn.Module):
    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        zero = _anchor(attention_mask)
        return (
            self.model.encode_image(image),
            self.model.encode_text(input_ids),
            self.model.logit_scale.exp().reshape(1) + zero,
            self.model.logit_bias.reshape(1) + zero,
        )


class VisionEncoder(nn.Module):
    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        # TAO's vision file carries the logit scale/bias too, so either file alone can score pairs.
        zero = _anchor(image)
        return (
            self.model.encode_image(image),
            self.model.logit_scale.exp().reshape(1) + zero,
            self.model.logit_bias.reshape(1) + zero,
        )


class TextEncoder(nn.Module):
    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        zero = _anchor(attention_mask)
        return (
            self.model.encode_text(input_ids),
            self.model.logit_scale.exp().reshape(1) + zero,
            self.model.logit_bias.reshape(1) + zero,
        )


@dataclass(frozen=True)
class EncoderSpec:
    module: type[nn.Module]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # Dynamic axes beyond the batch (NaFlex's patch count): input name -> {axis: name}.
    axes: dict = field(default_factory=dict)


ENCODER_SPECS = {
    "combined": EncoderSpec(
        CombinedEncoder,
        ("image", "input_ids", "attention_mask"),
        ("image_embedding", "text_embedding", "logit_scale", "logit_bias"),
    ),
    "vision": EncoderSpec(VisionEncoder, ("image",), ("image_embedding", "logit_scale", "logit_bias")),
    "text": EncoderSpec(TextEncoder, ("input_ids", "attention_mask"), ("text_embedding", "logit_scale", "logit_bias")),
}
BATCH_AXES = {
    "image": IMAGE_BATCH,
    "image_embedding": IMAGE_BATCH,
    "input_ids": TEXT_BATCH,
    "attention_mask": TEXT_BATCH,
    "text_embedding": TEXT_BATCH,
}

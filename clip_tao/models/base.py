"""The interface every model family implements.

A :class:`ClipModel` carries everything needed to use it: its encoders, its learnable logit
scale/bias, its tokenizer and its pre-processing (:class:`Preprocess`). Export, inference and
deploy read these from the model, never from a second copy.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clip_tao.models.tokenizer import Tokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# TAO's defaults for ``model.init_logit_scale`` / ``init_logit_bias`` when they are null.
DEFAULT_LOGIT_INIT = {
    "siglip": (math.log(10.0), -10.0),
    "clip": (math.log(1 / 0.07), 0.0),
}
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class Preprocess:
    """How images must look when they reach ``encode_image``."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # a torchvision InterpolationMode name
    resize_mode: str = "shortest"  # resize the short side, then center-crop
    # NaFlex: each image keeps its aspect ratio within a budget of ``max_num_patches`` patches of
    # ``patch_size`` pixels and reaches the model as a PatchBatch (``image_size`` is then unused by the data).
    patch_size: int | None = None
    max_num_patches: int | None = None

    @property
    def naflex(self) -> bool:
        return self.max_num_patches is not None


class ClipModel(nn.Module, metaclass=ABCMeta):
    """Two towers, a shared embedding space, and learnable ``logit_scale`` / ``logit_bias``.

    Subclasses implement the abstract members: ``image_features`` / ``text_features``
    (un-normalised ``[B, D]``), the towers, the logit parameters and gradient checkpointing.
    """

    model_type: str
    tokenizer: Tokenizer
    preprocess: Preprocess
    # False for models whose inputs an ONNX graph cannot express.
    exportable: bool = True

    # -- what a family implements ---------------------------------------------------------------
    @abstractmethod
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, D]`` un-normalised image features."""

    @abstractmethod
    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` -> ``[B, D]`` un-normalised text features."""

    @abstractmethod
    def vision_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the image tower (frozen by ``freeze_vision_encoder``, trained at ``vision_lr``)."""

    @abstractmethod
    def text_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the text tower (frozen by ``freeze_text_encoder``, trained at ``text_lr``)."""

    @abstractmethod
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory."""

    @property
    @abstractmethod
    def logit_scale(self) -> nn.Parameter:
        """log of the similarity temperature; ``exp()`` multiplies cosine similarities."""

    @property
    @abstractmethod
    def logit_bias(self) -> nn.Parameter:
        """Added to the scaled similarities (SigLIP's bias; 0 and unused by the softmax loss)."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """D, the width of both embeddings."""

    # -- shared behaviour -----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, D]`` L2-normalised embeddings."""
        return F.normalize(self.image_features(pixels), dim=-1)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids -> ``[B, D]`` L2-normalised embeddings."""
        return F.normalize(self.text_features(input_ids), dim=-1)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(input_ids)

    def logit_parameters(self) -> list[nn.Parameter]:
        return [self.logit_scale, self.logit_bias]

    @torch.no_grad()
    def init_logits(self, scale: float, bias: float) -> None:
        self.logit_scale.fill_(scale)
        self.logit_bias.fill_(bias)

    @torch.no_grad()
    def clamp_logit_scale(self, ceiling: float = MAX_LOGIT_SCALE) -> None:
        """Keep the raw scale within [0, ceiling] so training cannot blow the temperature up.

        TAO 7.3's ceiling is ``max(ln 100, the raw scale when training starts)`` (:func:`logit_scale_ceiling`):
        a pretrained or restored scale above ln 100 is kept, not cut.
        """
        self.logit_scale.clamp_(0.0, ceiling)

    def logit_scale_ceiling(self) -> float:
        """TAO 7.3's clamp ceiling for this model's current (starting) raw scale."""
        return max(MAX_LOGIT_SCALE, float(self.logit_scale.detach().max()))


def preprocess_from_config(config: dict, image_size: int) -> Preprocess:
    """The :class:`Preprocess` described by a model config's ``mean``/``std``/``interpolation``."""
    return Preprocess(
        image_size=image_size,
        mean=tuple(config.get("mean", OPENAI_MEAN)),
        std=tuple(config.get("std", OPENAI_STD)),
        interpolation=config.get("interpolation", "bicubic"),
        resize_mode=config.get("resize_mode", "shortest"),
    )


def checked_image_size(model_type: str, requested: int | None, native: int, patch_size: int) -> int:
    """The image size to build with: the requested one if the patch grid allows it, else ``native``."""
    from clip_tao.errors import ModelError

    size = requested or native
    if size <= 0 or size % patch_size:
        raise ModelError(
            f"model.image_size={size} does not fit {model_type}: use a multiple of its patch size "
            f"{patch_size} (its own size is {native})"
        )
    return size


@contextmanager
def seeded_init(seed: int = 0):
    """Random initialisation that is the same every time (for types without published weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield

"""NaFlex image transforms: each image keeps its aspect ratio within the model's patch budget.

Evaluation does exactly what transformers' ``Siglip2ImageProcessor`` does (resize to
:func:`~clip_tao.models.patches.naflex_image_size`, bilinear with antialiasing on uint8, then its fused
rescale + normalise). Training applies ``dataset.augmentation`` *before* that aspect-preserving resize:
torchvision's random resized crop (area in ``scale``, aspect ratio in [3/4, 4/3]) picks a box of the
source image, and the box — not a square — is what gets resized into the budget. Colour jitter and
grayscale then act on the resized image, as they act after the crop in the fixed-size pipeline.
A transform returns a normalised ``[3, h, w]`` image; :func:`batch_stacker` turns a list of them into
a :class:`~clip_tao.models.patches.PatchBatch`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as tvF

from clip_tao.config.schema import AugmentationConfig
from clip_tao.models.base import Preprocess
from clip_tao.models.patches import naflex_image_size, normalise_uint8, patch_batch

# torchvision's RandomResizedCrop default aspect-ratio range.
CROP_RATIO = (3 / 4, 4 / 3)


class NaFlexResize:
    """PIL RGB image -> normalised ``[3, h, w]`` float32 at the processor's size for its patch budget."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess
        self.interpolation = T.InterpolationMode[preprocess.interpolation.upper()]

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """``[3, H, W]`` uint8 -> ``[3, h, w]`` uint8, aspect kept, ``h x w`` within the budget."""
        p = self.preprocess
        height, width = naflex_image_size(image.shape[-2], image.shape[-1], p.patch_size, p.max_num_patches)
        return tvF.resize(image, [height, width], interpolation=self.interpolation, antialias=True)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        return normalise_uint8(image, self.preprocess.mean, self.preprocess.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.resize(tvF.pil_to_tensor(image)))


class NaFlexTrainTransform(NaFlexResize):
    """Random resized crop of the source (any aspect in [3/4, 4/3] of the box), aspect-preserving resize,
    colour jitter with probability, random grayscale, normalise. Draws from torch's default generator, so
    ``wds.seeded_transform`` makes it a function of the sample's seed."""

    def __init__(self, preprocess: Preprocess, aug: AugmentationConfig):
        super().__init__(preprocess)
        self.scale = tuple(aug.scale)
        probability, brightness, contrast, saturation, hue = aug.color_jitter
        self.colour = T.Compose(
            [
                T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=probability),
                T.RandomGrayscale(p=aug.grayscale),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = tvF.pil_to_tensor(image)
        top, left, height, width = T.RandomResizedCrop.get_params(pixels, list(self.scale), list(CROP_RATIO))
        resized = self.resize(pixels[:, top : top + height, left : left + width])
        # Colour jitter on a PIL image is several times faster than on a uint8 tensor (the fixed-size
        # pipeline jitters PIL images too); the round trip is exact.
        return self.normalise(tvF.pil_to_tensor(self.colour(tvF.to_pil_image(resized))))


def batch_stacker(preprocess: Preprocess, pad_to: int | None = None) -> Callable:
    """How a collate function turns a list of transformed images into the model's input: ``torch.stack``
    for fixed-size models, a :class:`PatchBatch` padded to the longest sequence (or ``pad_to``) for NaFlex."""
    if not preprocess.naflex:
        return torch.stack
    return functools.partial(patch_batch, patch_size=preprocess.patch_size, pad_to=pad_to)

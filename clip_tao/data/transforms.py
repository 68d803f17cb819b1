"""Image transforms built from the model's own pre-processing and the spec's ``dataset.augmentation``.

The fixed-size training transform runs for every sample of every epoch, often in the training process
itself (``num_workers: 0``), so it does torchvision's work with fewer PyTorch calls a sample and the same
result to the bit: the crop is drawn by the same random numbers in the same order
(:class:`DrawnResizedCrop`), ``ToTensor`` + ``Normalize`` are one table look-up
(:class:`NormalizedTensor`), and colour steps that cannot change a pixel are left out when no random step
follows them (their draws would decide nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from clip_tao.config.schema import AugmentationConfig
from clip_tao.errors import ConfigError
from clip_tao.models.base import Preprocess


def _interpolation(preprocess: Preprocess) -> T.InterpolationMode:
    return T.InterpolationMode[preprocess.interpolation.upper()]


def build_eval_transform(preprocess: Preprocess) -> Callable:
    """Resize to the model's size as the model was trained — the short side then a center crop
    (``resize_mode: shortest``, CLIP), or both sides without a crop (``squash``, SigLIP's processor) —
    and normalise. NaFlex models keep each image's aspect ratio (:mod:`clip_tao.data.naflex`)."""
    if preprocess.naflex:
        from clip_tao.data.naflex import NaFlexResize

        return NaFlexResize(preprocess)
    size = preprocess.image_size
    if preprocess.resize_mode == "squash":
        resize = [T.Resize((size, size), interpolation=_interpolation(preprocess))]
    else:
        resize = [T.Resize(size, interpolation=_interpolation(preprocess)), T.CenterCrop(size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])


def build_train_transform(preprocess: Preprocess, aug: AugmentationConfig) -> Callable:
    """Random resized crop (``aug.scale``), color jitter with probability, random grayscale, normalise.
    NaFlex models crop, then resize keeping the crop's aspect ratio (:mod:`clip_tao.data.naflex`)."""
    check_augmentation(aug)
    if preprocess.naflex:
        from clip_tao.data.naflex import NaFlexTrainTransform

        return NaFlexTrainTransform(preprocess, aug)
    probability, brightness, contrast, saturation, hue = aug.color_jitter
    crop = DrawnResizedCrop(preprocess.image_size, scale=tuple(aug.scale), interpolation=_interpolation(preprocess))
    colour = [T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=probability)]
    colour.append(T.RandomGrayscale(p=aug.grayscale))
    # A step that leaves every pixel as it is only matters for the random numbers it draws, and those only
    # for the random steps after it: trailing ones go (the generator is reseeded for every sample).
    changes_pixels = [probability > 0 and max(brightness, contrast, saturation, hue) > 0, aug.grayscale > 0]
    while colour and not changes_pixels[len(colour) - 1]:
        colour.pop()
    return T.Compose([crop, *colour, NormalizedTensor(preprocess.mean, preprocess.std)])


class DrawnResizedCrop(T.RandomResizedCrop):
    """torchvision's ``RandomResizedCrop`` with its box drawn in fewer PyTorch calls: the same draws from
    the default generator in the same order (area fraction, log aspect ratio, then top and left), each
    rounded as torchvision rounds it, so the same box for the same generator state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        log_ratio = torch.log(torch.tensor(self.ratio))  # float32, as torchvision takes the logarithm
        self._log_ratio = (float(log_ratio[0]), float(log_ratio[1]))

    def get_params(self, img, scale, ratio) -> tuple[int, int, int, int]:
        if tuple(scale) != tuple(self.scale) or tuple(ratio) != tuple(self.ratio):
            return T.RandomResizedCrop.get_params(img, scale, ratio)
        width, height = img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2])
        area = height * width
        draw = torch.empty(1)
        for _ in range(10):
            target_area = area * draw.uniform_(scale[0], scale[1]).item()
            aspect_ratio = draw.uniform_(*self._log_ratio).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                return top, left, h, w
        # Ten misses (extreme aspect ratios): torchvision's fallback, the centre box within the ratio range.
        if width / height < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif width / height > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


class NormalizedTensor:
    """``ToTensor`` then ``Normalize`` for 8-bit RGB images, as one look-up per value: the table holds what
    those two transforms make of each of the 256 levels in each channel (float32 operations give the same
    result for the same input wherever it sits), so the output is theirs to the bit, in fewer operations."""

    def __init__(self, mean, std):
        self.fallback = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        levels = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2), "RGB")
        self.table = self.fallback(levels).reshape(3, 256)  # [channel, level]

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            return self.fallback(image)
        width, height = image.size
        levels = torch.from_numpy(np.array(image)).permute(2, 0, 1).reshape(3, -1).long()  # [3, H*W]
        return self.table.gather(1, levels).view(3, height, width)

    def __repr__(self) -> str:
        return f"NormalizedTensor(mean={self.fallback.transforms[1].mean}, std={self.fallback.transforms[1].std})"


def check_augmentation(aug: AugmentationConfig) -> None:
    key = "dataset.augmentation"
    if len(aug.scale) != 2 or not 0 < aug.scale[0] <= aug.scale[1] <= 1:
        raise ConfigError(f"{key}.scale={aug.scale} must be [min, max] with 0 < min <= max <= 1")
    if len(aug.color_jitter) != 5:
        raise ConfigError(
            f"{key}.color_jitter={aug.color_jitter} must have 5 numbers: "
            "[probability, brightness, contrast, saturation, hue]"
        )
    probability, *strengths = aug.color_jitter
    hue = strengths[-1]
    if not 0 <= probability <= 1 or min(strengths) < 0 or hue > 0.5:
        raise ConfigError(
            f"{key}.color_jitter={aug.color_jitter}: probability must lie in [0, 1], strengths >= 0, hue <= 0.5"
        )
    if not 0 <= aug.grayscale <= 1:
        raise ConfigError(f"{key}.grayscale={aug.grayscale} must be a probability in [0, 1]")

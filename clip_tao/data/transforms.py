"""Image transforms built from the model's own pre-processing and the spec's ``dataset.augmentation``."""

from __future__ import annotations

from collections.abc import Callable

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
    return T.Compose(
        [
            T.RandomResizedCrop(
                preprocess.image_size, scale=tuple(aug.scale), interpolation=_interpolation(preprocess)
            ),
            T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=probability),
            T.RandomGrayscale(p=aug.grayscale),
            T.ToTensor(),
            T.Normalize(preprocess.mean, preprocess.std),
        ]
    )


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

"""NaFlex inputs: images at their own aspect ratio as padded sequences of patches.

What transformers' ``Siglip2ImageProcessor`` does, split so a data loader can do it per sample and per
batch: :func:`naflex_image_size` (the largest size keeping the aspect ratio whose grid of ``p``-pixel
patches fits ``max_num_patches``), :func:`normalise_uint8` (the processor's fused rescale + normalise, so
pixels are bit-identical), :func:`image_to_patch_sequence` and :func:`patch_batch` (padding to the
longest sequence of the batch, or to a fixed count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Beyond this many times the position table's side, the resized positions no longer carry what the
# model was trained on, and the resize weights (``P x G^2`` an image) grow without bound.
MAX_POSITION_STRETCH = 8


class PatchBudgetError(ValueError):
    """An image whose patch grid cannot fit the budget at any scale (skipped and counted, as bad images are)."""

    reason = "too_thin_for_patch_budget"


def naflex_image_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """``(height, width)`` the processor resizes an image to: aspect kept, multiples of ``patch_size``,
    at least one patch a side, at most ``max_num_patches`` patches. Raises :class:`PatchBudgetError`
    for an image so elongated that even its smallest scale exceeds the budget."""
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    if height < 1 or width < 1:
        raise PatchBudgetError(f"an image of {height}x{width} pixels has no patches")
    new_height, new_width = get_image_size_for_max_num_patches(height, width, patch_size, max_num_patches)
    if (new_height // patch_size) * (new_width // patch_size) > max_num_patches:
        raise PatchBudgetError(
            f"an image of {height}x{width} pixels is too elongated for max_num_patches={max_num_patches} "
            f"({new_height // patch_size}x{new_width // patch_size} patches at its smallest scale): raise the budget"
        )
    return new_height, new_width


def check_max_num_patches(value: int, table_patches: int, key: str = "model.max_num_patches") -> int:
    """``value`` if the position table of ``table_patches`` entries can be resized to it; else ConfigError."""
    from clip_tao.errors import ConfigError

    limit = table_patches * MAX_POSITION_STRETCH**2
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise ConfigError(
            f"{key}={value!r} must be an integer in [1, {limit}]: the model's {table_patches}-entry position table "
            f"stretches at most {MAX_POSITION_STRETCH}x a side (256 is the processor's default)"
        )
    return value


def normalise_uint8(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[3, H, W]`` uint8 -> float32 ``(x / 255 - mean) / std``, computed as the processor does (one
    normalise with ``mean``/``std`` scaled by 255) so the result is bit-identical to its output."""
    from torchvision.transforms.v2 import functional as tvF

    rescale = 1 / 255
    mean_255 = torch.tensor(mean) * (1.0 / rescale)
    std_255 = torch.tensor(std) * (1.0 / rescale)
    return tvF.normalize(image.to(torch.float32), mean_255, std_255)


def image_to_patch_sequence(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[C, H, W]`` -> ``[rows*cols, p*p*C]``: patches row-major, each flattened (y, x, channel)."""
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    patches = image.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


@dataclass
class PatchBatch:
    """A batch of NaFlex images: what ``Siglip2Model`` takes.

    ``pixel_values [B, P, p*p*3]`` float, ``pixel_attention_mask [B, P]`` int32 (1: a real patch),
    ``spatial_shapes [B, 2]`` int64 (rows, cols of each image's grid). Behaves like a batch tensor where
    the loops need it: ``len``, slicing along the batch, ``.to()``, ``.pin_memory()``.
    """

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    spatial_shapes: torch.Tensor

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def __getitem__(self, index) -> PatchBatch:
        if not isinstance(index, slice):
            index = slice(index, index + 1) if isinstance(index, int) else index
        return PatchBatch(self.pixel_values[index], self.pixel_attention_mask[index], self.spatial_shapes[index])

    def to(self, *args, **kwargs) -> PatchBatch:
        """Move to a device; only ``pixel_values`` changes dtype (the mask and shapes stay integers)."""
        values = self.pixel_values.to(*args, **kwargs)
        device_only = {k: v for k, v in kwargs.items() if k != "dtype"}
        return PatchBatch(
            values,
            self.pixel_attention_mask.to(values.device, **_non_blocking(device_only)),
            self.spatial_shapes.to(values.device, **_non_blocking(device_only)),
        )

    def pin_memory(self) -> PatchBatch:
        return PatchBatch(*(t.pin_memory() for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pixel_values, self.pixel_attention_mask, self.spatial_shapes

    @property
    def num_patches(self) -> int:
        """P, the padded sequence length."""
        return self.pixel_values.shape[1]

    def padding_fraction(self) -> float:
        """Share of the batch's patch slots that are padding."""
        return 1.0 - float(self.pixel_attention_mask.sum()) / max(self.pixel_attention_mask.numel(), 1)


def _non_blocking(kwargs: dict) -> dict:
    return {"non_blocking": kwargs["non_blocking"]} if "non_blocking" in kwargs else {}


def concat_patch_batches(batches: Sequence[PatchBatch]) -> PatchBatch:
    """One :class:`PatchBatch` of several, each padded with zeros to the longest sequence among them."""
    length = max(b.num_patches for b in batches)
    return PatchBatch(
        torch.cat([F.pad(b.pixel_values, (0, 0, 0, length - b.num_patches)) for b in batches]),
        torch.cat([F.pad(b.pixel_attention_mask, (0, length - b.num_patches)) for b in batches]),
        torch.cat([b.spatial_shapes for b in batches]),
    )


def patch_batch(images: Sequence[torch.Tensor], patch_size: int, pad_to: int | None = None) -> PatchBatch:
    """Normalised ``[3, h_i, w_i]`` images (multiples of ``patch_size``) -> a :class:`PatchBatch` padded
    with zeros to the longest sequence, or to ``pad_to`` patches (the processor pads to its budget)."""
    sequences = [image_to_patch_sequence(image, patch_size) for image in images]
    longest = max(s.shape[0] for s in sequences)
    length = max(longest, pad_to or 0)
    values = torch.stack([F.pad(s, (0, 0, 0, length - s.shape[0])) for s in sequences])
    mask = torch.zeros(len(sequences), length, dtype=torch.int32)
    for i, sequence in enumerate(sequences):
        mask[i, : sequence.shape[0]] = 1
    shapes = torch.tensor(
        [[image.shape[-2] // patch_size, image.shape[-1] // patch_size] for image in images], dtype=torch.long
    )
    return PatchBatch(values, mask, shapes)

"""Fixed batches for the loss tests (one process and torchrun alike).

``worked_batch`` is a worked example whose loss values were computed by hand from TAO 7.3's formulas: four rows of a
toy dataset in TAO's pairs-file form after loading (image row 2's "not visible" lower colour is -1; accessory
lists right-padded with 0), unit embeddings at fixed angles, scale 10 and bias -10.
"""

from __future__ import annotations

import math

import torch

MASK_CASES = [  # (mode, accessories, compatible_positive_weight, normalization)
    ("none", False, 1.0, "per_query"),
    ("attribute_match_ignore", False, 1.0, "per_query"),
    ("attribute_plus_accessory_match_ignore", True, 1.0, "per_query"),
    ("attribute_match_positive", False, 1.0, "per_pair"),
    ("attribute_match_positive", False, 0.5, "per_pair"),
    ("attribute_match_positive", False, 0.5, "per_query"),
    ("attribute_plus_accessory_match_positive", True, 1.0, "per_pair"),
    ("attribute_plus_accessory_match_positive", True, 0.5, "per_pair"),
    ("attribute_plus_accessory_match_positive", True, 0.5, "per_query"),
]


def _unit(degrees) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees], dtype=torch.float64)


def worked_batch() -> dict[str, torch.Tensor]:
    return {
        "image": _unit([0, 30, 90, 10]),
        "text": _unit([4, 12, 55, 22]),
        "image_attr": torch.tensor([[1, 1], [1, 2], [2, -1], [1, 1]]),
        "text_attr": torch.tensor([[1, -1], [1, -1], [2, -1], [1, 1]]),
        "image_acc": torch.tensor([[1, 0], [1, 2], [0, 0], [0, 0]]),
        "text_acc": torch.tensor([[0], [2], [0], [0]]),
        "raw_scale": torch.tensor(math.log(10.0), dtype=torch.float64),
        "bias": torch.tensor(-10.0, dtype=torch.float64),
    }


def random_features(n: int = 8, dim: int = 16):
    """L2-normalised float64 features (exact enough that communication order cannot show) and logit values."""
    g = torch.Generator().manual_seed(7)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)

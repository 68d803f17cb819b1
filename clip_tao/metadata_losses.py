"""TAO 7.3's auxiliary and metadata-aware losses: batch-hard triplet, and the SigLIP loss with attribute masks.

Kept apart from :mod:`clip_tao.losses` (the plain contrastive losses) because they need more than the
embeddings: the triplet loss works on cosine similarities without scale or bias, the masked loss on the
batch's attribute metadata (TAO's ``*_pairs.json`` fields).

**Compatibility** of text ``t`` and image ``i`` (TAO's metadata mask): every attribute the text specifies
(a value >= 0; a negative value is a wildcard) equals the image's (a negative image value, "unknown", equals
nothing specified), and, in the ``attribute_plus_accessory_*`` modes, every accessory ID the text requires
(> 0; 0 is padding) is among the image's.

**Masked SigLIP loss** (``train.siglip_loss_mask_mode``), over logits ``z = exp(raw)·<x_i, y_j> + b`` of the local
images against the texts (the local ones under ``local``, every rank's under ``gather``): the paired text of
image ``i`` is the positive; in the ``*_ignore`` modes a compatible other pair is left out of the sum; in the
``*_positive`` modes it is a positive of weight ``compatible_positive_weight`` (``per_pair``), or that weight
shared among the images promoted for the text (``per_query``, counted over every rank under ``gather``).
``loss = -Σ_valid w·log σ(label·z) / B_local`` — the local image count, never the number of terms, as
open_clip's SigLipLoss divides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_tao.errors import ConfigError

MASK_MODES = (
    "none",
    "attribute_match_ignore",
    "attribute_plus_accessory_match_ignore",
    "attribute_match_positive",
    "attribute_plus_accessory_match_positive",
)


def triplet_loss(image: torch.Tensor, text: torch.Tensor, margin: float) -> torch.Tensor:
    """TAO's symmetric batch-hard triplet loss on the local batch (pair ``i`` is the positive of row ``i``).

    ``S = norm(image)·norm(text)ᵀ``; per row ``relu(margin − S[i,i] + max_{j≠i} S[i,j])``, averaged, for images
    (rows of S) and texts (rows of Sᵀ), then the mean of the two. 0 for a batch of fewer than two pairs.
    """
    if image.shape[0] < 2:
        return image.sum() * 0.0
    sim = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T

    def rows(m: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
        hardest = m.masked_fill(eye, float("-inf")).max(dim=1).values
        return F.relu(margin - m.diagonal() + hardest).mean()

    return 0.5 * (rows(sim) + rows(sim.T))


def compatibility(
    text_attr: torch.Tensor,
    image_attr: torch.Tensor,
    text_acc: torch.Tensor | None = None,
    image_acc: torch.Tensor | None = None,
    accessories: bool = False,
) -> torch.Tensor:
    """``[T, I]`` booleans: text ``t`` is compatible with image ``i`` (see the module's docstring).

    ``*_attr``: ``[n, A]`` integer attribute IDs (negative: unconstrained text / unknown image);
    ``*_acc``: ``[n, K]`` accessory IDs right-padded with 0 (needed when ``accessories``).
    """
    wildcard = text_attr[:, None, :] < 0
    attr = (wildcard | (text_attr[:, None, :] == image_attr[None, :, :])).all(dim=-1)
    if not accessories:
        return attr
    if text_acc is None or image_acc is None:
        raise ValueError("the accessory modes need text and image accessory IDs")
    if (text_acc < 0).any() or (image_acc < 0).any():
        raise ValueError("accessory IDs must be >= 0 (0 pads a row)")
    present = (text_acc[:, None, :, None] == image_acc[None, :, None, :]).any(dim=-1)  # [T, I, K_text]
    required = text_acc[:, None, :] > 0
    return attr & (present | ~required).all(dim=-1)


def masked_siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    compatible: torch.Tensor | None,
    mode: str,
    positive_weight: float = 1.0,
    normalization: str = "per_query",
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """The metadata-masked SigLIP loss of this rank's images.

    ``image``/``text``: the local L2-normalised ``[B, D]`` embeddings; ``logit_scale`` is the raw (log) scale.
    ``compatible``: ``[B, N]`` booleans, local image ``i`` against text ``j`` of all ``N`` texts the loss scores
    (``N = B`` with ``world_size`` 1, which is also TAO's ``local``; else every rank's texts in rank order,
    ``gather``); None with ``mode="none"``.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"siglip_loss_mask_mode must be one of {', '.join(MASK_MODES)}, got {mode!r}")
    batch = image.shape[0]
    texts = text
    if world_size > 1:
        import torch.distributed.nn.functional as dist_fn

        texts = torch.cat(dist_fn.all_gather(text))  # gradients flow back to every rank's text tower
    paired = torch.arange(batch, device=image.device) + (rank * batch if world_size > 1 else 0)
    rows = torch.arange(batch, device=image.device)
    logits = logit_scale.exp() * image @ texts.T + logit_bias
    labels = -torch.ones_like(logits)
    labels[rows, paired] = 1.0
    weights = torch.ones_like(logits)
    if mode == "none":
        valid = torch.ones_like(logits, dtype=torch.bool)
    else:
        if compatible is None or tuple(compatible.shape) != tuple(logits.shape):
            raise ValueError(f"compatible must be a {list(logits.shape)} mask of images against texts")
        valid = ~compatible
        valid[rows, paired] = True
        if mode.endswith("_positive"):
            promoted = compatible.clone()
            promoted[rows, paired] = False
            labels[promoted] = 1.0
            valid |= promoted
            if normalization == "per_pair":
                weights[promoted] = positive_weight
            elif normalization == "per_query":
                per_text = promoted.sum(dim=0).to(logits.dtype)
                if world_size > 1:
                    torch.distributed.all_reduce(per_text)  # the promoted images of every rank
                share = positive_weight / per_text.clamp(min=1.0)
                weights = torch.where(promoted, share.expand_as(logits), weights)
            else:
                raise ValueError(f"compatible_positive_normalization must be per_pair or per_query: {normalization!r}")
    terms = weights * F.logsigmoid(labels * logits)
    return -(terms * valid).sum() / batch


def _pair_args(negatives, info) -> dict:
    """What a batch's hard negatives and pair ids hand on to the wrapped loss (nothing when it has none)."""
    return {} if info is None else {"negatives": negatives, "info": info}


class TripletAugmentedLoss(nn.Module):
    """``base + triplet_loss_weight · triplet`` (TAO 7.3), with both figures kept for the logs
    (``train/contrastive_loss``, ``train/triplet_loss``)."""

    def __init__(self, base: nn.Module, weight: float, margin: float):
        super().__init__()
        self.base, self.weight, self.margin = base, weight, margin
        self.last_figures: dict[str, torch.Tensor] = {}
        self._sums: dict[str, float] = {}
        self._count = 0

    def forward(self, image, text, logit_scale, logit_bias, negatives=None, info=None) -> torch.Tensor:
        contrastive = self.base(image, text, logit_scale, logit_bias, **_pair_args(negatives, info))
        triplet = triplet_loss(image, text, self.margin)
        self.last_figures = {"contrastive_loss": contrastive.detach(), "triplet_loss": triplet.detach()}
        return contrastive + self.weight * triplet.to(contrastive.dtype)

    def end_step(self) -> dict[str, float]:
        figures = {k: float(v) for k, v in self.last_figures.items()}
        for k, v in figures.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        return figures

    def epoch_figures(self) -> dict[str, float]:
        out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out


class MaskedSiglipLoss(nn.Module):
    """:func:`masked_siglip_loss` as the trainer's loss: the step's mask is set first (:meth:`set_mask`)."""

    def __init__(self, mode: str, weight: float, normalization: str, rank: int, world_size: int, dist_impl: str):
        super().__init__()
        if dist_impl not in ("local", "gather"):
            raise ValueError(f"the masked SigLIP loss exchanges texts by local or gather, not {dist_impl!r}")
        self.mode, self.weight, self.normalization = mode, weight, normalization
        self.gather = dist_impl == "gather" and world_size > 1
        self.rank, self.world_size = (rank, world_size) if self.gather else (0, 1)
        self.compatible: torch.Tensor | None = None
        # TAO 7.3's diagnostic in the *_positive modes: off-diagonal pairs promoted to positives, on this rank.
        self.promoted: torch.Tensor | None = None
        self._promoted_sum, self._steps = 0.0, 0

    def set_mask(self, compatible: torch.Tensor) -> None:
        """``[B_local, N]``: this rank's images against the texts the loss scores (every rank's under gather)."""
        self.compatible = compatible

    def forward(self, image, text, logit_scale, logit_bias, negatives=None, info=None) -> torch.Tensor:
        if negatives is not None:
            raise ConfigError(
                "train.siglip_loss_mask_mode and hard negatives do not combine: set train.hard_negatives_per_sample=0 "
                "or siglip_loss_mask_mode=none"
            )
        mask = None if self.compatible is None else self.compatible.to(image.device)
        if mask is not None and self.mode.endswith("_positive"):
            rows = torch.arange(mask.shape[0], device=mask.device)
            paired = rows + (self.rank * mask.shape[0] if self.gather else 0)
            self.promoted = (mask.sum() - mask[rows, paired].sum()).detach()
        return masked_siglip_loss(
            image, text, logit_scale, logit_bias, mask, self.mode, self.weight, self.normalization,
            self.rank, self.world_size,
        )  # fmt: skip

    def end_step(self) -> dict[str, float]:
        """The step's figures for the logs (TAO: ``train/compatible_positive_pairs_per_rank``); none in the other
        modes."""
        if self.promoted is None:
            return {}
        count, self.promoted = float(self.promoted), None
        self._promoted_sum += count
        self._steps += 1
        return {"compatible_positive_pairs_per_rank": count}

    def epoch_figures(self) -> dict[str, float]:
        """The epoch's mean count a step (the trainer averages it over the ranks)."""
        if not self._steps:
            return {}
        out = {"compatible_positive_pairs_per_rank": self._promoted_sum / self._steps}
        self._promoted_sum, self._steps = 0.0, 0
        return out

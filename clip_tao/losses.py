"""Contrastive losses: sigmoid (SigLIP) and softmax (CLIP), distributed-aware.

Both are open_clip's implementations (``SigLipLoss`` exchanges text features between ranks,
``ClipLoss`` gathers features with gradients), so single- and multi-process training share one code
path. Inputs: L2-normalised ``[B, D]`` embeddings and the *log* logit scale, as models store it.
``train.siglip_loss_dist_impl`` (TAO 7.3) picks SigLipLoss's exchange (bidir, shift, reduce, gather: the same
loss, other communication), or ``local``: each rank scores only its own batch (no cross-rank negatives).

With hard negatives or ``duplicate_pairs`` other than ``negative``, the batch's :class:`PairInfo` picks
:class:`~clip_tao.pair_losses.PairContrastiveLoss` instead (open_clip has no such losses; it gathers like
``gather``).
"""

from __future__ import annotations

import torch
from torch import nn

from clip_tao.pair_losses import PairContrastiveLoss, PairInfo


class ContrastiveLoss(nn.Module):
    """``loss(image_emb, text_emb, logit_scale, logit_bias) -> scalar``; pair i of the batch is the positive."""

    def __init__(
        self,
        loss_type: str,
        rank: int = 0,
        world_size: int = 1,
        duplicate_pairs: str = "negative",
        dist_impl: str = "gather",
    ):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.loss_type = loss_type
        self.duplicate_pairs = duplicate_pairs
        self.pairs = PairContrastiveLoss(loss_type, duplicate_pairs, rank, world_size)
        if loss_type == "siglip":
            self.impl = siglip_loss(rank, world_size, dist_impl)
        elif loss_type == "clip":
            self.impl = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)
        else:
            raise ValueError(f"loss_type must be 'siglip' or 'clip', got {loss_type!r}")

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        negatives: torch.Tensor | None = None,
        info: PairInfo | None = None,
    ) -> torch.Tensor:
        """``negatives``: ``[B*K, D]`` hard-negative caption embeddings (``K`` a sample, in sample order)."""
        if info is not None and (negatives is not None or self.duplicate_pairs != "negative"):
            return self.pairs(image_emb, text_emb, logit_scale, logit_bias, negatives, info)
        scale = logit_scale.exp()
        if self.loss_type == "siglip":
            return self.impl(image_emb, text_emb, scale, logit_bias)
        return self.impl(image_emb, text_emb, scale)


SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather", "local")


def siglip_loss(rank: int, world_size: int, dist_impl: str) -> nn.Module:
    """open_clip's ``SigLipLoss`` with TAO 7.3's ``siglip_loss_dist_impl``; ``local`` is a one-process loss."""
    from open_clip.loss import SigLipLoss

    if dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(f"siglip_loss_dist_impl must be one of {', '.join(SIGLIP_DIST_IMPLS)}, got {dist_impl!r}")
    if dist_impl == "local":
        return SigLipLoss(rank=0, world_size=1)
    return SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)

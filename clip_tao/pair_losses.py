"""Contrastive losses that know more than "pair i is the positive": hard negatives and duplicate pairs.

:class:`PairInfo` describes each sample of a step: a 63-bit id of the caption it trains on, the ids of every
caption of its image, an id of the image's content, and which of its ``K`` hard-negative slots hold a caption
(and their ids). Ids are hashes of the text / image bytes (:func:`text_id`), so equal ids mean equal content.

The losses gather every rank's embeddings (with gradients) and info; each rank computes its own samples'
rows against the whole gathered batch, so the mean over ranks equals the one-process loss on the
concatenated batch, and with DDP's gradient averaging so do the gradients. Memory is ``B x N`` a rank.

Definitions (N images/captions of the global batch, ``s`` the logit scale, ``b`` the bias):

- duplicate pairs: image ``i`` and caption ``j != i`` are a duplicate pair when caption ``j`` is one of
  image ``i``'s own captions (the same text, or another caption of a multi-caption image) or image ``j`` is
  byte-identical to image ``i``. ``negative`` treats them as negatives (open_clip's behaviour), ``ignore``
  leaves them out of the loss, ``positive`` counts them as positives.
- clip: image->text cross-entropy over the N captions plus every hard negative of the batch (NegCLIP's
  extra columns); text->image over the N images. A row with several positives P takes the mean of
  ``-log softmax`` over P (a uniform target over the positives). The two directions are averaged.
- siglip: ``-sum log sigmoid(label * (s x.y + b)) / N`` over the N x N pairs, labels +1 on the diagonal
  (and on duplicate pairs with ``positive``), plus each image's own hard negatives as extra -1 pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

PAD = -1  # an id no text or image gets (ids are non-negative)


def text_id(text: str) -> int:
    """A stable non-negative 63-bit id of ``text`` (equal texts, equal ids)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def bytes_id(data: bytes) -> int:
    """A stable non-negative 63-bit id of a file's bytes."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@dataclass
class PairInfo:
    """Per sample of one process's step (rows in the order of its embeddings)."""

    caption_ids: torch.Tensor  # [B] int64: the caption trained on
    caption_sets: torch.Tensor  # [B, C] int64: every caption of the image, PAD-filled
    image_ids: torch.Tensor  # [B] int64: the image's content (a unique id when not hashed)
    negative_ids: torch.Tensor  # [B, K] int64: the hard negatives' texts, PAD where a slot is empty

    @property
    def negative_valid(self) -> torch.Tensor:
        return self.negative_ids != PAD

    @classmethod
    def cat(cls, parts: list[PairInfo]) -> PairInfo:
        width = max(p.caption_sets.shape[1] for p in parts)
        sets = [F.pad(p.caption_sets, (0, width - p.caption_sets.shape[1]), value=PAD) for p in parts]
        return cls(
            torch.cat([p.caption_ids for p in parts]),
            torch.cat(sets),
            torch.cat([p.image_ids for p in parts]),
            torch.cat([p.negative_ids for p in parts]),
        )

    def first(self, n: int) -> PairInfo:
        return PairInfo(self.caption_ids[:n], self.caption_sets[:n], self.image_ids[:n], self.negative_ids[:n])

    def to(self, device, non_blocking: bool = False) -> PairInfo:
        return PairInfo(*(t.to(device, non_blocking=non_blocking) for t in (self.caption_ids, self.caption_sets, self.image_ids,
                                                  self.negative_ids)))  # fmt: skip


def duplicate_pairs(info: PairInfo, images: slice = slice(None), captions: slice = slice(None)) -> torch.Tensor:
    """``[images, captions]`` bool: image ``i`` and caption ``j != i`` describe each other (see module doc)."""
    sets, ids = info.caption_sets[images], info.image_ids
    own = (sets[:, :, None] == info.caption_ids[captions][None, None, :]).any(dim=1)  # caption j in image i's set
    pairs = own | (ids[images][:, None] == ids[captions][None, :])
    rows = torch.arange(len(ids), device=ids.device)
    return pairs & (rows[images][:, None] != rows[captions][None, :])


class PairContrastiveLoss(torch.nn.Module):
    """``loss(image [B,D], text [B,D], log_scale, bias, negatives [B*K,D] | None, info) -> scalar``.

    Each process computes the rows of its own samples against the whole gathered batch (as open_clip's
    SigLIP loss does), divided by its own batch size: the mean over processes is the whole batch's loss, and
    with DDP's gradient averaging so are the gradients.
    """

    def __init__(self, loss_type: str, duplicates: str = "negative", rank: int = 0, world_size: int = 1):
        super().__init__()
        if duplicates not in ("negative", "ignore", "positive"):
            raise ValueError(f"duplicate_pairs must be negative, ignore or positive, got {duplicates!r}")
        self.loss_type = loss_type
        self.duplicates = duplicates
        self.rank = rank
        self.world_size = world_size

    def forward(self, image, text, logit_scale, logit_bias, negatives=None, info: PairInfo | None = None):
        if info is None:
            raise ValueError("PairContrastiveLoss needs the batch's PairInfo")
        b = len(image)
        mine = slice(self.rank * b, (self.rank + 1) * b)  # this process's rows of the gathered batch
        info = _gather_info(info.to(image.device), self.world_size)
        all_image, all_text = _gather(image, self.world_size), _gather(text, self.world_size)
        k = info.negative_ids.shape[1]
        scale = logit_scale.exp()
        if self.loss_type == "siglip":
            return self._siglip(image, all_text, negatives if k else None, scale, logit_bias, info, mine)
        all_negatives = _gather(negatives, self.world_size) if negatives is not None and k else None
        return self._clip(image, text, all_image, all_text, all_negatives, scale, info, mine)

    def _masks(self, info: PairInfo, images: slice, captions: slice, n_rows: int, n_cols: int):
        """``(positive, keep)`` of image rows ``images`` against caption columns ``captions`` (global slices)."""
        device = info.image_ids.device
        rows = torch.arange(n_rows, device=device)[:, None] + (images.start or 0)
        cols = torch.arange(n_cols, device=device)[None, :] + (captions.start or 0)
        positive = rows == cols
        keep = torch.ones_like(positive)
        if self.duplicates != "negative":
            dup = duplicate_pairs(info, images, captions)
            if self.duplicates == "positive":
                positive = positive | dup
            else:
                keep = ~dup
        return positive, keep

    def _clip(self, image, text, all_image, all_text, all_negatives, scale, info, mine):
        b, n = len(image), len(all_image)
        # image -> text: this process's images against every caption (and every hard negative)
        i2t = scale * image @ all_text.T
        positive, keep = self._masks(info, mine, slice(None), b, n)
        if all_negatives is not None:
            valid = info.negative_valid.reshape(1, -1).expand(b, -1)
            if self.duplicates != "negative":  # a hard negative that is one of the image's own captions is none
                owned = (info.caption_sets[mine][:, :, None] == info.negative_ids.reshape(1, 1, -1)).any(dim=1)
                valid = valid & ~owned
            i2t = torch.cat([i2t, scale * image @ all_negatives.T], dim=1)
            positive = torch.cat([positive, torch.zeros_like(valid)], dim=1)
            keep = torch.cat([keep, valid], dim=1)
        image_to_text = _multi_positive_ce(i2t, positive, keep)
        # text -> image: this process's captions against every image
        t2i = scale * text @ all_image.T
        positive, keep = self._masks(info, slice(None), mine, n, b)
        text_to_image = _multi_positive_ce(t2i, positive.T, keep.T)
        return (image_to_text + text_to_image) / 2

    def _siglip(self, image, all_text, negatives, scale, bias, info, mine):
        b, n = len(image), len(all_text)
        logits = scale * image @ all_text.T + bias
        positive, keep = self._masks(info, mine, slice(None), b, n)
        labels = positive.to(logits.dtype) * 2 - 1
        total = -(keep.to(logits.dtype) * F.logsigmoid(labels * logits)).sum()
        if negatives is not None:
            k = info.negative_ids.shape[1]
            own = negatives.reshape(b, k, -1)  # each image's own negatives, never gathered
            neg_logits = scale * torch.einsum("nd,nkd->nk", image, own) + bias
            total = total - (info.negative_valid[mine].to(logits.dtype) * F.logsigmoid(-neg_logits)).sum()
        return total / b


def _multi_positive_ce(logits: torch.Tensor, positive: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-mean_{j in positive} log softmax(logits over kept columns)_j``."""
    masked = logits.masked_fill(~(keep | positive), float("-inf"))
    log_p = masked.log_softmax(dim=1)
    pos = positive.to(logits.dtype)
    per_row = -(log_p.masked_fill(~positive, 0.0) * pos).sum(dim=1) / pos.sum(dim=1)
    return per_row.mean()


def _gather(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's rows in rank order, with gradients flowing back to each rank's own rows."""
    if world_size == 1:
        return t
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.functional.all_gather(t.contiguous()))


def _gather_plain(t: torch.Tensor, world_size: int) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def _gather_info(info: PairInfo, world_size: int) -> PairInfo:
    if world_size == 1:
        return info
    width = torch.tensor([info.caption_sets.shape[1]], device=info.caption_sets.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)  # ranks may have different caption counts
    sets = F.pad(info.caption_sets, (0, int(width) - info.caption_sets.shape[1]), value=PAD)
    return PairInfo(*(_gather_plain(t, world_size) for t in (info.caption_ids, sets, info.image_ids,
                                                              info.negative_ids)))  # fmt: skip

"""Image-text retrieval metrics, exact, computed block by block (memory O(chunk x N), never O(N^2)).

Directions are always named: ``i2t`` ranks all texts for each image query, ``t2i`` ranks all images
for each text query. ``text_to_image[j]`` is the index of the image that caption ``j`` describes
(default: caption ``i`` <-> image ``i``); an image may have several captions.

Figures, for each direction, averaged over queries:

- ``R@K`` (K = 1, 5, 10), percent: a relevant item is among the first K results.
- ``MedR`` / ``MeanR``: median / mean 1-based rank of the first relevant result.
- ``mAP``, percent: mean average precision over all relevant items of a query (as scikit-learn's
  ``average_precision_score``; for one relevant item it is 1 / rank).
- ``AUC``, in [0, 1]: ROC AUC of the query's similarities, relevant vs irrelevant (as scikit-learn's
  ``roc_auc_score``), averaged over queries.

How: one pass over the similarity matrix in blocks of captions. Each block serves both directions: its rows
rank images for those captions (t2i), its columns rank those captions for every image (i2t, counts summed
over blocks). Only counts are kept — how many irrelevant items score at least / more than each relevant
pair — so memory is one block, and large blocks are counted by a fused (``torch.compile``) kernel.

Ties: an irrelevant item with exactly the same similarity as a relevant one is ranked *before* it,
so a tie never makes a result look better than it is (ranks, R@K, mAP). ROC AUC counts a tied pair
as one half, which is the standard definition. Images without any caption have no i2t figures and
are left out of the i2t averages (counted in ``i2t_num_queries``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
FIGURES = tuple(f"R@{k}" for k in RECALL_AT) + ("mAP", "MedR", "MeanR", "AUC")
BLOCK_ELEMENTS = 1 << 26  # similarities per block: 256 MB in float32
COMPILE_ABOVE = 1 << 24  # blocks at least this large are counted by the compiled kernel


@dataclass
class RetrievalResult:
    """All figures, plus the 1-based first-hit rank of every query (for R@K curves and histograms)."""

    figures: dict[str, float]
    i2t_ranks: np.ndarray  # one per image that has at least one caption
    t2i_ranks: np.ndarray  # one per caption


def retrieval_metrics(
    image_embeddings: torch.Tensor | np.ndarray,
    text_embeddings: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | list[int] | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Every figure for both directions.

    Args:
        image_embeddings: ``[N_i, D]`` L2-normalised.
        text_embeddings: ``[N_t, D]`` L2-normalised.
        text_to_image: ``[N_t]`` image index of each caption; ``None`` means ``arange(N_t)`` (needs N_t == N_i).
        chunk_size: captions scored at once (default: as many as fit 256 MB of similarities); memory is
            about ``chunk_size x N_i`` floats.
        device: where to compute (default: the embeddings' device).

    Returns:
        ``{"i2t_R@1": ..., "t2i_AUC": ..., "num_images": N_i, "num_texts": N_t, ...}``.
    """
    return compute_retrieval(image_embeddings, text_embeddings, text_to_image, chunk_size, device).figures


def compute_retrieval(
    image_embeddings: torch.Tensor | np.ndarray,
    text_embeddings: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | list[int] | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> RetrievalResult:
    """:func:`retrieval_metrics` plus the per-query ranks."""
    images = torch.as_tensor(image_embeddings, dtype=torch.float32)
    texts = torch.as_tensor(text_embeddings, dtype=torch.float32)
    device = torch.device(device) if device is not None else images.device
    images, texts = images.to(device), texts.to(device)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"need [N_i, D] and [N_t, D] embeddings, got {tuple(images.shape)} and {tuple(texts.shape)}")
    num_images, num_texts = images.shape[0], texts.shape[0]
    if text_to_image is None:
        if num_images != num_texts:
            raise ValueError(f"{num_texts} texts for {num_images} images: pass text_to_image")
        text_to_image = torch.arange(num_texts)
    owner = torch.as_tensor(text_to_image, dtype=torch.long).to(device)
    if owner.shape != (num_texts,) or (num_texts and (owner.min() < 0 or owner.max() >= num_images)):
        raise ValueError(f"text_to_image must hold {num_texts} image indices in [0, {num_images})")
    if num_images == 0 or num_texts == 0:
        raise ValueError("need at least one image and one caption")

    # The similarity of every relevant (caption, image) pair.
    pair = (texts * images[owner]).sum(1)
    relevant, valid = _captions_of_each_image(owner, num_images)
    slot_scores = torch.where(valid, pair[relevant], torch.full_like(relevant, 0, dtype=pair.dtype))
    # Thresholds per image slot for the column counts; +inf for empty slots counts nothing.
    column_thresholds = torch.where(valid, slot_scores, torch.full_like(slot_scores, math.inf)).T.contiguous()

    t2i_ge = torch.empty(num_texts, dtype=torch.long, device=device)
    t2i_gt = torch.empty_like(t2i_ge)
    i2t_ge = torch.zeros(relevant.shape[1], num_images, dtype=torch.long, device=device)
    i2t_gt = torch.zeros_like(i2t_ge)
    step = chunk_size or max(1, BLOCK_ELEMENTS // num_images)
    for start in range(0, num_texts, step):
        stop = min(start + step, num_texts)
        block = texts[start:stop] @ images.T  # [c, N_i]: rows rank images (t2i), columns rank captions (i2t)
        # Take the relevant pairs out: what is counted below is irrelevant items only.
        block[torch.arange(stop - start, device=device), owner[start:stop]] = -math.inf
        ge_row, gt_row, ge_col, gt_col = _count(block, pair[start:stop].unsqueeze(1), column_thresholds)
        t2i_ge[start:stop], t2i_gt[start:stop] = ge_row, gt_row
        i2t_ge += ge_col
        i2t_gt += gt_col

    t2i_figures, t2i_ranks = _t2i_figures(t2i_ge, t2i_gt, num_images)
    i2t_figures, i2t_ranks = _i2t_figures(i2t_ge.T, i2t_gt.T, slot_scores, valid, num_texts)
    figures = {f"t2i_{k}": v for k, v in t2i_figures.items()}
    figures.update({f"i2t_{k}": v for k, v in i2t_figures.items()})
    figures["num_images"] = num_images
    figures["num_texts"] = num_texts
    return RetrievalResult(figures, i2t_ranks, t2i_ranks)


def _t2i_figures(neg_ge: torch.Tensor, neg_gt: torch.Tensor, num_images: int) -> tuple[dict, np.ndarray]:
    """Each caption has one relevant image: rank = 1 + irrelevant images scoring >= it."""
    neg_ge, neg_gt = neg_ge.double().cpu(), neg_gt.double().cpu()
    ranks = 1 + neg_ge
    num_neg = num_images - 1
    aucs = (num_neg - neg_ge + 0.5 * (neg_ge - neg_gt)) / num_neg if num_neg else torch.full_like(ranks, math.nan)
    return _summarise(ranks, 1.0 / ranks, aucs), ranks.numpy()


def _i2t_figures(neg_ge, neg_gt, scores, valid, num_texts: int) -> tuple[dict, np.ndarray]:
    """Images with captions only; ``neg_*`` ``[N_i, R]``: irrelevant captions scoring >= / > each caption."""
    keep = valid.any(1)
    neg_ge, neg_gt, scores, valid = neg_ge[keep].double(), neg_gt[keep].double(), scores[keep], valid[keep]
    # How many of the image's own captions score >= each of them ([n, R, R], R is small).
    rel_ge = ((scores.unsqueeze(1) >= scores.unsqueeze(2)) & valid.unsqueeze(1)).sum(2).double()
    num_rel = valid.sum(1).double()
    best = torch.where(valid, scores, torch.full_like(scores, -math.inf)).argmax(1, keepdim=True)
    ranks = (1 + neg_ge.gather(1, best)).squeeze(1)  # first hit: irrelevant captions scoring >= the best one go first
    precision = torch.where(valid, rel_ge / (rel_ge + neg_ge).clamp(min=1), torch.zeros_like(rel_ge))
    aps = precision.sum(1) / num_rel
    num_neg = num_texts - num_rel
    neg_lt, neg_eq = num_neg.unsqueeze(1) - neg_ge, neg_ge - neg_gt
    wins = ((neg_lt + 0.5 * neg_eq) * valid).sum(1)
    aucs = torch.where(num_neg > 0, wins / (num_rel * num_neg).clamp(min=1), torch.full_like(wins, math.nan))
    return _summarise(ranks.cpu(), aps.cpu(), aucs.cpu()), ranks.cpu().numpy()


def _summarise(ranks: torch.Tensor, aps: torch.Tensor, aucs: torch.Tensor) -> dict[str, float]:
    figures = {f"R@{k}": float((ranks <= k).double().mean() * 100) for k in RECALL_AT}
    figures["mAP"] = float(aps.mean() * 100)
    figures["MedR"] = float(np.median(ranks.numpy()))  # torch's median picks the lower middle value
    figures["MeanR"] = float(ranks.mean())
    figures["AUC"] = float(torch.nanmean(aucs))
    figures["num_queries"] = len(ranks)
    return figures


def _captions_of_each_image(owner: torch.Tensor, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N_i, Rmax]`` caption indices of each image (padded with 0) and their validity mask."""
    counts = torch.bincount(owner, minlength=num_images)
    width = max(int(counts.max()), 1)
    order = torch.argsort(owner, stable=True)
    sorted_owner = owner[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(owner), device=owner.device) - starts[sorted_owner]
    relevant = torch.zeros(num_images, width, dtype=torch.long, device=owner.device)
    mask = torch.zeros(num_images, width, dtype=torch.bool, device=owner.device)
    relevant[sorted_owner, slot] = order
    mask[sorted_owner, slot] = True
    return relevant, mask


def _count_eager(block: torch.Tensor, row_thresholds: torch.Tensor, column_thresholds: torch.Tensor):
    """Per row: entries >= / > its threshold; per column and slot: entries >= / > the slot's threshold."""
    ge_row = (block >= row_thresholds).sum(1)
    gt_row = (block > row_thresholds).sum(1)
    ge_col = torch.stack([(block >= t).sum(0) for t in column_thresholds])
    gt_col = torch.stack([(block > t).sum(0) for t in column_thresholds])
    return ge_row, gt_row, ge_col, gt_col


def _count_fused(block: torch.Tensor, row_thresholds: torch.Tensor, column_thresholds: torch.Tensor):
    """The same counts written for the compiler: it fuses them into one read of the block."""
    ge_row = (block >= row_thresholds).sum(1)
    gt_row = (block > row_thresholds).sum(1)
    ge_col = (block.unsqueeze(0) >= column_thresholds.unsqueeze(1)).sum(1)
    gt_col = (block.unsqueeze(0) > column_thresholds.unsqueeze(1)).sum(1)
    return ge_row, gt_row, ge_col, gt_col


_compiled_count = None
_compile_failed = False


def _count(block: torch.Tensor, row_thresholds: torch.Tensor, column_thresholds: torch.Tensor):
    """Counts of one block: a compiled, fused kernel for large blocks (several times faster than eager),
    the eager version for small ones or where compiling is not possible."""
    global _compiled_count, _compile_failed
    if block.numel() >= COMPILE_ABOVE and not _compile_failed:
        try:
            if _compiled_count is None:
                _compiled_count = torch.compile(_count_fused, dynamic=True)
            return _compiled_count(block, row_thresholds, column_thresholds)
        except Exception as exc:  # no C++ compiler / Triton: stay exact, just slower
            _compile_failed = True
            log.warning("counting with the compiled kernel failed (%s): using eager PyTorch", str(exc).splitlines()[0])
    return _count_eager(block, row_thresholds, column_thresholds)

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

Ties: an irrelevant item with exactly the same similarity as a relevant one is ranked *before* it,
so a tie never makes a result look better than it is (ranks, R@K, mAP). ROC AUC counts a tied pair
as one half, which is the standard definition. Images without any caption have no i2t figures and
are left out of the i2t averages (counted in ``i2t_num_queries``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

RECALL_AT = (1, 5, 10)
FIGURES = tuple(f"R@{k}" for k in RECALL_AT) + ("mAP", "MedR", "MeanR", "AUC")


def retrieval_metrics(
    image_embeddings: torch.Tensor | np.ndarray,
    text_embeddings: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | list[int] | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Every figure for both directions.

    Args:
        image_embeddings: ``[N_i, D]`` L2-normalised.
        text_embeddings: ``[N_t, D]`` L2-normalised.
        text_to_image: ``[N_t]`` image index of each caption; ``None`` means ``arange(N_t)`` (needs N_t == N_i).
        chunk_size: queries scored at once; memory is about ``chunk_size x max(N_i, N_t)`` floats.
        device: where to compute (default: the embeddings' device).

    Returns:
        ``{"i2t_R@1": ..., "t2i_AUC": ..., "num_images": N_i, "num_texts": N_t, ...}``.
    """
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

    results: dict[str, float] = {}
    # t2i: each caption has exactly one relevant image.
    t2i = _rank_queries(
        texts, images, owner.unsqueeze(1), torch.ones(num_texts, 1, dtype=torch.bool, device=device), chunk_size
    )
    results.update({f"t2i_{name}": value for name, value in t2i.items()})
    # i2t: each image's relevant texts are its captions.
    relevant, mask = _captions_of_each_image(owner, num_images)
    has_caption = mask.any(dim=1)
    i2t = _rank_queries(images[has_caption], texts, relevant[has_caption], mask[has_caption], chunk_size)
    results.update({f"i2t_{name}": value for name, value in i2t.items()})
    results["num_images"] = num_images
    results["num_texts"] = num_texts
    return results


def _captions_of_each_image(owner: torch.Tensor, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N_i, Rmax]`` caption indices of each image (padded with 0) and their validity mask."""
    counts = torch.bincount(owner, minlength=num_images)
    width = max(int(counts.max()) if len(owner) else 0, 1)
    order = torch.argsort(owner, stable=True)
    sorted_owner = owner[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(owner), device=owner.device) - starts[sorted_owner]
    relevant = torch.zeros(num_images, width, dtype=torch.long, device=owner.device)
    mask = torch.zeros(num_images, width, dtype=torch.bool, device=owner.device)
    relevant[sorted_owner, slot] = order
    mask[sorted_owner, slot] = True
    return relevant, mask


def _rank_queries(
    queries: torch.Tensor, gallery: torch.Tensor, relevant: torch.Tensor, mask: torch.Tensor, chunk_size: int
) -> dict[str, float]:
    """Figures for ``queries`` ranking ``gallery``; ``relevant[q]`` (where ``mask[q]``) are q's hits."""
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    if num_queries == 0:
        return {**{name: math.nan for name in FIGURES}, "num_queries": 0}
    first_ranks, average_precisions, aucs = [], [], []
    for start in range(0, num_queries, max(1, chunk_size)):
        stop = min(start + chunk_size, num_queries)
        scores = queries[start:stop] @ gallery.T  # [c, N]
        rel, valid = relevant[start:stop], mask[start:stop]
        rel_scores = scores.gather(1, rel)  # [c, R]
        # For every relevant item: how many gallery items score >= / > it.
        n_ge = torch.stack([(scores >= rel_scores[:, k : k + 1]).sum(1) for k in range(rel.shape[1])], 1)
        n_gt = torch.stack([(scores > rel_scores[:, k : k + 1]).sum(1) for k in range(rel.shape[1])], 1)
        # The same counts among the query's relevant items only ([c, R, R], R is small).
        pair_ge = (rel_scores.unsqueeze(1) >= rel_scores.unsqueeze(2)) & valid.unsqueeze(1)
        pair_gt = (rel_scores.unsqueeze(1) > rel_scores.unsqueeze(2)) & valid.unsqueeze(1)
        rel_ge, rel_gt = pair_ge.sum(2), pair_gt.sum(2)
        num_rel = valid.sum(1)

        # First hit: every irrelevant item scoring >= the best relevant one comes before it.
        best = torch.where(valid, rel_scores, torch.full_like(rel_scores, -math.inf)).argmax(1, keepdim=True)
        first_ranks.append((1 + n_ge.gather(1, best) - rel_ge.gather(1, best)).squeeze(1))

        precision = rel_ge.double() / n_ge.double()
        average_precisions.append((precision * valid).sum(1) / num_rel)

        num_neg = num_gallery - num_rel
        neg_gt = n_gt - rel_gt
        neg_eq = (n_ge - n_gt) - (rel_ge - rel_gt)
        neg_lt = num_neg.unsqueeze(1) - neg_gt - neg_eq
        wins = ((neg_lt + 0.5 * neg_eq) * valid).sum(1).double()
        aucs.append(torch.where(num_neg > 0, wins / (num_rel * num_neg).clamp(min=1), torch.full_like(wins, math.nan)))

    ranks = torch.cat(first_ranks).double().cpu()
    figures = {f"R@{k}": float((ranks <= k).double().mean() * 100) for k in RECALL_AT}
    figures["mAP"] = float(torch.cat(average_precisions).mean().cpu() * 100)
    figures["MedR"] = float(np.median(ranks.numpy()))  # torch's median picks the lower middle value
    figures["MeanR"] = float(ranks.mean())
    figures["AUC"] = float(torch.nanmean(torch.cat(aucs)).cpu())
    figures["num_queries"] = num_queries
    return figures

"""Exact retrieval figures for queries that each have a *set* of relevant gallery items.

:mod:`clip_tao.metrics` ranks a caption against its one image. Here a query may have any number of relevant
items, as TAO 7.3's PAS queries do (every image whose attribute metadata matches the caption). The figures
and rules are those of :mod:`clip_tao.metrics`, per query and then averaged:

- ``R@K``: a relevant item is among the first K; ``MedR`` / ``MeanR``: rank of the first relevant item;
- ``mAP``: average precision over all relevant items (as scikit-learn's ``average_precision_score``);
- ``AUC``: ROC AUC, relevant against irrelevant (a tie counts one half, as scikit-learn's ``roc_auc_score``).

Ties: an irrelevant item with exactly the relevant one's similarity ranks before it. Twins (bit-identical gallery
embeddings) get the same similarity by construction. NaN or infinite similarities count against the model: an
irrelevant one ranks before every relevant item, a relevant one after every other item.

How: blocks of queries against the whole gallery (memory about one block, never queries x gallery at once).
Each block row is sorted once with its relevant items set to -inf, which puts them first; the number of
irrelevant items at or above each relevant score is then a binary search in that row, exact for any number of
relevant items. (With one relevant item a query, :mod:`clip_tao.metrics` counts by comparison instead.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clip_tao.metrics import BLOCK_ELEMENTS, embedding_pair, first_equal_rows, ieee_float32_matmul, summarise

log = logging.getLogger(__name__)

# A block's sort keeps its values and int64 positions, three times the block: a quarter of metrics' block size.
SORTED_BLOCK_ELEMENTS = BLOCK_ELEMENTS // 4


@dataclass
class PositiveSetResult:
    """The figures, and each query's first-hit rank, average precision and ROC AUC (to pool several galleries:
    :func:`clip_tao.metrics.summarise` of the concatenated arrays)."""

    figures: dict[str, float]
    ranks: np.ndarray
    aps: np.ndarray
    aucs: np.ndarray


def rank_positive_sets(
    queries: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    positives: Sequence[Iterable[int]],
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> PositiveSetResult:
    """Rank the gallery for every query and score the query's relevant items.

    Args:
        queries: ``[N_q, D]`` L2-normalised (e.g. text embeddings).
        gallery: ``[N_g, D]`` L2-normalised (e.g. image embeddings).
        positives: for each query, the gallery indices relevant to it (at least one; repeats count once).
        chunk_size: queries ranked at once (default: as many as fit 64 M similarities).
        device: where to compute (default: the embeddings' device).
    """
    q, g = embedding_pair(queries, gallery, device, ("N_q", "N_g"))
    device = q.device
    if len(q) == 0 or len(g) == 0:
        raise ValueError("need at least one query and one gallery item")
    starts, members = _positive_lists(positives, len(q), len(g), device)
    gallery_first = first_equal_rows(g)
    copies = None
    if gallery_first is not None:  # twins: every copy takes the first one's similarities
        copies = torch.nonzero(gallery_first != torch.arange(len(g), device=device))[:, 0]
    step = chunk_size or max(1, SORTED_BLOCK_ELEMENTS // len(g))
    ge, gt, rel_ge = (torch.empty(len(members), dtype=torch.long, device=device) for _ in range(3))
    non_finite = 0
    with ieee_float32_matmul():
        for start in range(0, len(q), step):
            stop = min(start + step, len(q))
            block = q[start:stop] @ g.T
            if copies is not None:
                block[:, copies] = block[:, gallery_first[copies]]
            span = slice(int(starts[start]), int(starts[stop]))
            non_finite += _count_block(block, starts[start : stop + 1] - starts[start], members[span],
                                       ge[span], gt[span], rel_ge[span])  # fmt: skip
    if non_finite:
        log.warning("%d similarities are NaN or infinite: each is ranked against the model", non_finite)
    ranks, aps, aucs = _per_query(starts, ge, gt, rel_ge, len(g))
    return PositiveSetResult(summarise(ranks, aps, aucs), ranks.numpy(), aps.numpy(), aucs.numpy())


def _positive_lists(positives, num_queries: int, num_gallery: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR form: ``starts[i]:starts[i+1]`` of ``members`` are query i's distinct relevant indices."""
    if len(positives) != num_queries:
        raise ValueError(f"{len(positives)} positive sets for {num_queries} queries")
    lists = []
    for i, members in enumerate(positives):
        members = sorted({int(m) for m in members})
        if not members:
            raise ValueError(f"query {i} has no relevant gallery item")
        if members[0] < 0 or members[-1] >= num_gallery:
            raise ValueError(f"query {i}: relevant indices must lie in [0, {num_gallery})")
        lists.append(members)
    counts = torch.tensor([len(m) for m in lists], dtype=torch.long)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    return starts.to(device), torch.tensor([m for ms in lists for m in ms], dtype=torch.long, device=device)


def _count_block(block, starts, members, ge, gt, rel_ge) -> int:
    """For each relevant pair of the block's queries: irrelevant items scoring >= / > it (``ge``, ``gt``) and
    relevant items of the same query scoring >= it (``rel_ge``). Returns the number of non-finite similarities."""
    rows = torch.repeat_interleave(torch.arange(len(block), device=block.device), starts.diff())
    scores = block[rows, members]
    non_finite = 0
    if not torch.isfinite(block.sum()):
        non_finite = int((~torch.isfinite(block)).sum())
        block.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=math.inf)  # irrelevant: above everything
        scores = torch.where(torch.isfinite(scores), scores, -math.inf)  # relevant: below everything
    # Relevant items become -inf, below every irrelevant item (which are finite or +inf by now): after the
    # sort, each row's first m entries are its own relevant items and a search counts irrelevant items only.
    block[rows, members] = -math.inf
    ordered = torch.sort(block, dim=1).values
    relevant_per_row = starts.diff()
    slot = torch.arange(len(members), device=block.device) - starts[rows]
    width = int(relevant_per_row.max())
    padded = torch.full((len(block), width), math.inf, device=block.device)  # +inf pads: never below a score
    padded[rows, slot] = scores
    below = torch.searchsorted(ordered, padded)  # items < score (the row's m placeholders among them)
    at_or_below = torch.searchsorted(ordered, padded, right=True)
    m = relevant_per_row.unsqueeze(1)
    irrelevant = block.shape[1] - m
    # A relevant score of -inf has every placeholder at or above it but none below: clamp at zero.
    ge[:] = (irrelevant - (below - m).clamp(min=0))[rows, slot]
    gt[:] = (irrelevant - (at_or_below - m).clamp(min=0))[rows, slot]
    own_sorted = torch.sort(padded, dim=1).values
    rel_ge[:] = (m - torch.searchsorted(own_sorted, padded))[rows, slot]
    return non_finite


def _per_query(starts, ge, gt, rel_ge, num_gallery: int):
    """First-hit rank, AP and AUC of each query from its relevant pairs' counts."""
    counts = starts.diff().cpu()
    query = torch.repeat_interleave(torch.arange(len(counts)), counts)
    ge, gt, rel_ge = ge.cpu().double(), gt.cpu().double(), rel_ge.cpu().double()
    num_queries = len(counts)
    # The best relevant item has the fewest irrelevant items at or above it.
    fewest = torch.full((num_queries,), math.inf, dtype=torch.float64).scatter_reduce_(0, query, ge, "amin")
    ranks = 1 + fewest
    precision = rel_ge / (rel_ge + ge)
    aps = torch.zeros(num_queries, dtype=torch.float64).index_add_(0, query, precision) / counts
    irrelevant = (num_gallery - counts).double()
    wins = torch.zeros(num_queries, dtype=torch.float64).index_add_(0, query, irrelevant[query] - ge + 0.5 * (ge - gt))
    aucs = torch.where(irrelevant > 0, wins / (counts * irrelevant).clamp(min=1), torch.full_like(wins, math.nan))
    return ranks, aps, aucs

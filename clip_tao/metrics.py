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
pair — so memory is one block. Blocks are counted in eager PyTorch (``COUNTING``): a fused ``torch.compile``
kernel reads each block once instead of once a comparison, but compiling it costs seconds in every fresh
process, more than the counting it saves (see :func:`_count`).

Ties: an irrelevant item with exactly the same similarity as a relevant one is ranked *before* it,
so a tie never makes a result look better than it is (ranks, R@K, mAP). ROC AUC counts a tied pair
as one half, which is the standard definition. Every similarity, the relevant pair's included, comes from
the same matrix product, and identical embeddings get bit-identical similarities, so twin captions or
images tie exactly. Images without any caption have no i2t figures and are left out of the i2t averages
(counted in ``i2t_num_queries``).

Non-finite similarities (NaN or +-inf, from a diverged model) count against the model: an irrelevant one
ranks before every relevant item, a relevant one after every other item; a warning gives their number.
An all-NaN model therefore scores R@K = 0 and AUC = 0, never a perfect score.
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
CACHE_ELEMENTS = 1 << 20  # similarities compared at once on the CPU: 4 MB, stays in the cache
COUNTING = "eager"  # how blocks are counted: "eager" or "compiled" (see _count)


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
    images, texts = embedding_pair(image_embeddings, text_embeddings, device, ("N_i", "N_t"))
    device = images.device
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

    step = chunk_size or max(1, BLOCK_ELEMENTS // num_images)
    relevant, valid = _captions_of_each_image(owner, num_images)
    twins = _Twins.of(texts, images)
    with ieee_float32_matmul():
        # One block: its own pair scores are the thresholds. Several: the pair scores come first, from the
        # same matrix product on thin strips (BLAS gives an element the same value whatever the shapes);
        # the blocks check that, and any difference means a recount with the blocks' own values.
        pair = None if step >= num_texts else _pair_scores(texts, images, owner)
        counts = _count_blocks(texts, images, owner, relevant, valid, pair, step, twins)
        if pair is not None and not torch.equal(counts.pair, pair):
            log.debug("pair scores differ between strips and blocks: counting again with the blocks' values")
            counts = _count_blocks(texts, images, owner, relevant, valid, counts.pair, step, twins)
    if counts.non_finite:
        log.warning(
            "%d similarities are NaN or infinite: each is ranked against the model (see clip_tao.metrics)",
            counts.non_finite,
        )

    t2i_figures, t2i_ranks = _t2i_figures(counts.t2i_ge, counts.t2i_gt, num_images)
    slot_scores = _slot_scores(counts.pair, relevant, valid)
    i2t_figures, i2t_ranks = _i2t_figures(counts.i2t_ge.T, counts.i2t_gt.T, slot_scores, valid, num_texts)
    figures = {f"t2i_{k}": v for k, v in t2i_figures.items()}
    figures.update({f"i2t_{k}": v for k, v in i2t_figures.items()})
    figures["num_images"] = num_images
    figures["num_texts"] = num_texts
    return RetrievalResult(figures, i2t_ranks, t2i_ranks)


def embedding_pair(first, second, device, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[N, D]`` float32 embedding matrices of the same width on ``device`` (default: the first's)."""
    a = torch.as_tensor(first, dtype=torch.float32)
    b = torch.as_tensor(second, dtype=torch.float32)
    device = torch.device(device) if device is not None else a.device
    a, b = a.to(device), b.to(device)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"need [{names[0]}, D] and [{names[1]}, D] embeddings, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a, b


@dataclass
class _Counts:
    """Irrelevant items scoring >= / > each relevant pair, per direction, and the pair scores used."""

    t2i_ge: torch.Tensor  # [N_t]
    t2i_gt: torch.Tensor
    i2t_ge: torch.Tensor  # [R, N_i], one row per caption slot of an image
    i2t_gt: torch.Tensor
    pair: torch.Tensor  # [N_t] the relevant pair's score, as the blocks computed it (non-finite -> -inf)
    non_finite: int  # similarities that were NaN or infinite


def _count_blocks(texts, images, owner, relevant, valid, pair, step, twins) -> _Counts:
    """One pass over the similarity matrix in blocks of about ``step`` captions.

    ``pair`` gives the column thresholds (the i2t direction needs every pair score before the first block);
    ``None`` is allowed only when one block holds every caption.
    """
    device, num_texts, num_images = texts.device, texts.shape[0], images.shape[0]
    column_thresholds = None if pair is None else _slot_scores(pair, relevant, valid, empty=math.nan).T.contiguous()
    t2i_ge = torch.empty(num_texts, dtype=torch.long, device=device)
    t2i_gt = torch.empty_like(t2i_ge)
    i2t_ge = torch.zeros(relevant.shape[1], num_images, dtype=torch.long, device=device)
    i2t_gt = torch.zeros_like(i2t_ge)
    block_pair = torch.empty(num_texts, device=device)
    non_finite = 0
    for captions in twins.caption_blocks(num_texts, step):
        block = texts[captions] @ images.T  # [c, N_i]: rows rank images (t2i), columns rank captions (i2t)
        twins.make_equal(block, captions)
        rows = torch.arange(block.shape[0], device=device)
        columns = owner[captions]
        scores = block[rows, columns]
        if not torch.isfinite(block.sum()):
            # Against the model: an irrelevant NaN/inf scores above everything, a relevant one below.
            non_finite += int((~torch.isfinite(block)).sum())
            block.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=math.inf)
            scores = torch.where(torch.isfinite(scores), scores, -math.inf)
        block_pair[captions] = scores
        if column_thresholds is None:
            column_thresholds = _slot_scores(block_pair, relevant, valid, empty=math.nan).T.contiguous()
        # Take the relevant pairs out (NaN compares false): what is counted below is irrelevant items only.
        block[rows, columns] = math.nan
        counted = _count(block, scores.unsqueeze(1), column_thresholds)
        t2i_ge[captions], t2i_gt[captions] = counted[0], counted[1]
        i2t_ge += counted[2]
        i2t_gt += counted[3]
    return _Counts(t2i_ge, t2i_gt, i2t_ge, i2t_gt, block_pair, non_finite)


@dataclass
class _Twins:
    """Identical embeddings (repeated captions or images): each twin's similarities are copied from the
    first of its kind, so twins tie exactly (BLAS may round identical rows differently by their position).

    ``text_first[k]`` / ``image_first[j]``: index of the first embedding equal to caption k / image j.
    """

    text_first: torch.Tensor | None
    image_first: torch.Tensor | None

    @classmethod
    def of(cls, texts: torch.Tensor, images: torch.Tensor) -> _Twins:
        return cls(first_equal_rows(texts), first_equal_rows(images))

    def caption_blocks(self, num_texts: int, step: int):
        """Index tensors of about ``step`` captions each; twins are kept in one block."""
        device = self.image_first.device if self.image_first is not None else None
        if self.text_first is None:
            for start in range(0, num_texts, step):
                yield slice(start, min(start + step, num_texts))
            return
        order = torch.argsort(self.text_first, stable=True)  # twins next to each other
        first = self.text_first[order].tolist()
        start = 0
        while start < num_texts:
            stop = min(start + step, num_texts)
            while stop < num_texts and first[stop] == first[stop - 1]:
                stop += 1
            yield order[start:stop].to(device)
            start = stop

    def make_equal(self, block: torch.Tensor, captions) -> None:
        if self.image_first is not None:
            copies = torch.nonzero(self.image_first != torch.arange(len(self.image_first), device=block.device))[:, 0]
            block[:, copies] = block[:, self.image_first[copies]]
        if self.text_first is not None:
            first = self.text_first[captions]
            # Position in this block of each caption's first twin (twins share a block).
            position = {int(k): i for i, k in enumerate(captions.tolist())}
            copies = [(i, position[int(f)]) for i, f in enumerate(first.tolist()) if position.get(int(f), i) != i]
            if copies:
                target, source = torch.tensor(copies, device=block.device).T
                block[target] = block[source]


def first_equal_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``[N]`` index of the first row bit-for-bit equal to each row; ``None`` when all rows differ.

    Rows are grouped by a key computed exactly: their bits as integers times small integer weights, summed
    in float64 with every partial sum below 2**53, so no rounding happens and equal rows get equal keys
    whatever order or kernel the product uses (a rounded key would part twins by their position). Equality
    of the bits then decides; rows whose key collides with another row's are regrouped by an exact sort.
    """
    bits = x.contiguous().view(torch.int32)
    index = torch.arange(len(x), device=x.device)
    weights = _exact_key_weights(x.shape[1])
    if weights is None:  # too wide for an exact key: sort the rows themselves
        first = _first_of_groups(torch.unique(bits, dim=0, return_inverse=True)[1])
        return None if torch.equal(first, index) else first
    weights = weights.to(x.device)
    keys = torch.cat([part.double() @ weights for part in bits.split(1 << 14)])  # bounded memory
    first = _first_of_groups(torch.unique(keys, return_inverse=True)[1])
    collided = ~(bits[first] == bits).all(1)
    if collided.any():
        rows = index[torch.isin(first, first[collided])]
        first[rows] = rows[_first_of_groups(torch.unique(bits[rows], dim=0, return_inverse=True)[1])]
    return None if torch.equal(first, index) else first


def _exact_key_weights(dim: int) -> torch.Tensor | None:
    """``[dim]`` float64 integer weights such that ``bits @ weights`` is exact for int32 ``bits``: each
    product and partial sum stays below 2**53 (|bits| < 2**31, ``dim`` terms); ``None`` when ``dim`` is too
    large to leave the weights room."""
    weight_bits = 53 - 31 - max(1, math.ceil(math.log2(max(dim, 1))))
    if weight_bits < 8:
        return None
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, 2**weight_bits, (dim,), generator=generator).double()


def _first_of_groups(group: torch.Tensor) -> torch.Tensor:
    """For each row, the position of the first row with the same ``group`` label."""
    position = torch.arange(len(group), device=group.device)
    return torch.full_like(position, len(group)).scatter_reduce_(0, group, position, "amin")[group]


def _pair_scores(texts: torch.Tensor, images: torch.Tensor, owner: torch.Tensor, group: int = 256) -> torch.Tensor:
    """Every caption's score with its own image, from small matrix products of the captions (grouped by
    image) against the few images they describe; non-finite -> -inf."""
    num_texts, num_images = texts.shape[0], images.shape[0]
    order = torch.argsort(owner, stable=True)
    sorted_owner = owner[order].tolist()
    pair = torch.empty(num_texts, device=texts.device)
    # At least 16 rows and columns a product: single rows or columns may take another BLAS code path.
    least = 16
    for start in range(0, num_texts, group):
        stop = min(start + group, num_texts)
        first = max(0, min(start, num_texts - least))
        low = max(0, min(sorted_owner[first], num_images - least))
        high = max(sorted_owner[stop - 1] + 1, min(num_images, low + least))
        chosen = order[first:stop]
        strip = texts[chosen] @ images[low:high].T
        own = owner[chosen] - low
        pair[chosen] = strip[torch.arange(len(chosen), device=texts.device), own]
    return torch.where(torch.isfinite(pair), pair, -math.inf)


def _slot_scores(pair: torch.Tensor, relevant: torch.Tensor, valid: torch.Tensor, empty: float = 0.0):
    """``[N_i, R]`` the score of each image's captions; ``empty`` in unused slots."""
    return torch.where(valid, pair[relevant], torch.full(relevant.shape, empty, dtype=pair.dtype, device=pair.device))


class ieee_float32_matmul:
    """Full float32 products whatever the process set for training (TF32 would change ranks)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = self.saved


def _t2i_figures(neg_ge: torch.Tensor, neg_gt: torch.Tensor, num_images: int) -> tuple[dict, np.ndarray]:
    """Each caption has one relevant image: rank = 1 + irrelevant images scoring >= it."""
    neg_ge, neg_gt = neg_ge.double().cpu(), neg_gt.double().cpu()
    ranks = 1 + neg_ge
    num_neg = num_images - 1
    aucs = (num_neg - neg_ge + 0.5 * (neg_ge - neg_gt)) / num_neg if num_neg else torch.full_like(ranks, math.nan)
    return summarise(ranks, 1.0 / ranks, aucs), ranks.numpy()


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
    return summarise(ranks.cpu(), aps.cpu(), aucs.cpu()), ranks.cpu().numpy()


def summarise(ranks: torch.Tensor, aps: torch.Tensor, aucs: torch.Tensor) -> dict[str, float]:
    """The figures of a set of queries from each one's first-hit rank, average precision and ROC AUC (NaN: no
    irrelevant item, left out of the AUC mean)."""
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
    """Per row: entries >= / > its threshold; per column and slot: entries >= / > the slot's threshold.

    On the CPU, a few rows at a time, so each comparison and sum reads the cache rather than memory;
    comparisons write 0/1 floats, whose sums are vectorised (counts stay exact: below 2**24 in a float32 sum),
    in one thread: these operations are too short to share between threads (a busy machine stalls each one).
    On a GPU, the whole block at once into one-byte masks: counting is bound by memory traffic there.
    """
    if block.device.type != "cpu":
        return _count_in_slices(block, row_thresholds, column_thresholds, len(block), torch.bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows_at_once = max(1, CACHE_ELEMENTS // block.shape[1])
        mask_dtype = torch.float32 if block.shape[1] < 1 << 24 else torch.float64
        return _count_in_slices(block, row_thresholds, column_thresholds, rows_at_once, mask_dtype)
    finally:
        torch.set_num_threads(threads)


def _count_in_slices(block, row_thresholds, column_thresholds, rows_at_once: int, mask_dtype: torch.dtype):
    """:func:`_count_eager`'s counts, ``rows_at_once`` rows of the block at a time, comparisons written as
    ``mask_dtype`` (bool, or a float type wide enough to sum a row exactly)."""
    num_rows, num_columns = block.shape
    sum_dtype = torch.long if mask_dtype == torch.bool else mask_dtype
    ge_row = torch.empty(num_rows, dtype=sum_dtype, device=block.device)
    gt_row = torch.empty_like(ge_row)
    ge_col = torch.zeros(column_thresholds.shape, dtype=torch.long if mask_dtype == torch.bool else torch.float64,
                         device=block.device)  # fmt: skip
    gt_col = torch.zeros_like(ge_col)
    buffer = torch.empty(min(rows_at_once, num_rows), num_columns, dtype=mask_dtype, device=block.device)
    for start in range(0, num_rows, rows_at_once):
        stop = min(start + rows_at_once, num_rows)
        part, mask, threshold = block[start:stop], buffer[: stop - start], row_thresholds[start:stop]
        torch.ge(part, threshold, out=mask)
        torch.sum(mask, 1, out=ge_row[start:stop])
        torch.gt(part, threshold, out=mask)
        torch.sum(mask, 1, out=gt_row[start:stop])
        for slot, slot_thresholds in enumerate(column_thresholds):
            torch.ge(part, slot_thresholds, out=mask)
            ge_col[slot] += mask.sum(0)
            torch.gt(part, slot_thresholds, out=mask)
            gt_col[slot] += mask.sum(0)
    return ge_row.long(), gt_row.long(), ge_col.long(), gt_col.long()


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
    """Counts of one block. ``COUNTING``: ``"eager"`` (the default) or ``"compiled"`` (torch.compile, fused
    into one read of the block).

    Eager on every device, because evaluation usually runs in a fresh process. On the CPU importing and
    running the compiler costs more than a whole COCO-sized evaluation (4.8x the bare product against 1.5x
    eager, ``scripts/benchmark.py eval``). On a GPU eager counting moves about 16 + 12 R bytes a similarity
    (R: the most captions an image has; each comparison reads the block, writes a one-byte mask and sums
    it; one more read checks finiteness). By the data sheets, with one caption an image and D = 1152 that is
    about a fifth of the fp32 product's time, less than the seconds a compilation costs a fresh process at
    200k x 200k. ``scripts/gpu_check_throughput.py`` measures both modes on a GPU.
    """
    global _compiled_count, _compile_failed
    if COUNTING == "compiled" and not _compile_failed:
        try:
            if _compiled_count is None:
                _compiled_count = torch.compile(_count_fused, dynamic=True)
            return _compiled_count(block, row_thresholds, column_thresholds)
        except Exception as exc:  # no C++ compiler / Triton: stay exact, just slower
            _compile_failed = True
            log.warning("counting with the compiled kernel failed (%s): using eager PyTorch", str(exc).splitlines()[0])
    return _count_eager(block, row_thresholds, column_thresholds)

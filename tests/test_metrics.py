import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from clip_tao.metrics import compute_retrieval, retrieval_metrics


def _distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bit-for-bit distinct rows of float32 ``x`` and, for every row, the index of its distinct row."""
    _, first, inverse = np.unique(x.view(np.uint32), axis=0, return_index=True, return_inverse=True)
    return x[first], inverse.reshape(-1)


def _similarities(images, texts, product=None):
    """``[N_i, N_t]`` float64 similarities, every distinct image and caption scored once.

    Twins share one score by construction: a product computed straight over the rows may round identical
    rows at different positions differently (BLAS kernels treat the edges of their blocks apart), which
    would break the twins' ties in the reference itself.
    """
    product = product or (lambda a, b: a @ b.T)
    distinct_images, image_of = _distinct_rows(images)
    distinct_texts, text_of = _distinct_rows(texts)
    with np.errstate(invalid="ignore"):
        scores = product(distinct_images.astype(np.float64), distinct_texts.astype(np.float64))
    return scores[np.ix_(image_of, text_of)], (distinct_images, image_of, distinct_texts, text_of, scores)


def _assert_rounding_cannot_decide(images, texts, owner, distinct):
    """Every comparison the figures depend on is decided by the data, not by float32 rounding.

    A float32 product of rows of length D is within ``gamma_D * |x|.|y|`` of the exact value whatever the
    summation order (gamma_D = D u / (1 - D u), u = 2**-24), so a relevant score and another score of the
    same query that differ by more than their two error bounds compare the same in clip-tao and here. Equal
    scores are allowed where they are exact: the same distinct row (shared by construction), or small
    integers, whose float32 products are exact in any order.
    """
    distinct_images, image_of, distinct_texts, text_of, scores = distinct
    magnitudes = np.abs(distinct_images.astype(np.float64)) @ np.abs(distinct_texts.astype(np.float64)).T
    depth = images.shape[1]
    exact = all(np.array_equal(x, np.round(x)) for x in (images, texts)) and magnitudes.max() < 2**24
    if exact:
        return
    unit = 2.0**-24
    bound = depth * unit / (1 - depth * unit) * magnitudes + 2 * depth * 2.0**-53 * magnitudes  # float32 + ref
    finite = np.isfinite(scores)
    for text, image in enumerate(owner):  # each relevant pair against its row (i2t) and its column (t2i)
        i, t = image_of[image], text_of[text]
        if not finite[i, t]:
            continue
        for others, margins, own in ((scores[i], bound[i], t), (scores[:, t], bound[:, t], i)):
            gap = np.abs(others - scores[i, t]) - (margins + bound[i, t])
            gap[own] = np.inf
            gap[~np.isfinite(others)] = np.inf
            assert gap.min() > 0, f"caption {text} and image {image} nearly tie with another score: change the data"


def _reference(images, texts, owner, product=None):
    """Independent per-query computation with scikit-learn and a direct rank count.

    A non-finite similarity counts against the model (as documented): a relevant one below every other
    score, an irrelevant one above; +-1e30 stand in for the infinities scikit-learn refuses.
    """
    sims, distinct = _similarities(images, texts, product)
    _assert_rounding_cannot_decide(images, texts, owner, distinct)
    out = {}
    for direction in ("i2t", "t2i"):
        ranks, aps, aucs = [], [], []
        queries = range(len(images)) if direction == "i2t" else range(len(texts))
        for q in queries:
            if direction == "i2t":
                relevant, scores = owner == q, sims[q]
                if not relevant.any():
                    continue
            else:
                relevant, scores = np.arange(len(images)) == owner[q], sims[:, q]
            scores = np.where(np.isfinite(scores), scores, np.where(relevant, -1e30, 1e30))
            best = scores[relevant].max()
            ranks.append(1 + int(((scores >= best) & ~relevant).sum()))  # ties rank pessimistically
            aps.append(average_precision_score(relevant, scores))
            aucs.append(roc_auc_score(relevant, scores))
        ranks = np.array(ranks)
        for k in (1, 5, 10):
            out[f"{direction}_R@{k}"] = (ranks <= k).mean() * 100
        out[f"{direction}_mAP"] = np.mean(aps) * 100
        out[f"{direction}_MedR"] = np.median(ranks)
        out[f"{direction}_MeanR"] = ranks.mean()
        out[f"{direction}_AUC"] = np.mean(aucs)
    return out


def _blockwise_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` as many differently shaped products: rows in chunks of 1 to 129, each chunk padded with
    zero rows to another size and summed in another order (its inner dimension permuted).

    Identical rows of ``a`` in different chunks go through different kernels and summation orders, as on a
    CPU whose BLAS rounds rows at block edges differently: a reference must not depend on where a row sits.
    """
    rng = np.random.default_rng(11)
    out = np.empty((len(a), len(b)))
    sizes = [1, 2, 3, 7, 16, 17, 31, 64, 129]
    start, turn = 0, 0
    while start < len(a):
        stop = min(start + sizes[turn % len(sizes)], len(a))
        order = rng.permutation(a.shape[1])
        padded = np.zeros((stop - start + turn % 5, a.shape[1]))
        padded[: stop - start] = a[start:stop]
        with np.errstate(invalid="ignore"):
            out[start:stop] = (padded[:, order] @ b[:, order].T)[: stop - start]
        start, turn = stop, turn + 1
    return out


def _embeddings(rng, n, d, ties=None):
    if ties == "integers":
        # Small integers: every similarity is an exact integer in float32, so many tie exactly.
        return rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    x = rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    if ties == "twins":
        # Every fifth item repeats the one before (COCO and Flickr repeat captions; datasets repeat images):
        # twins score exactly the same against everything, so the documented rule decides their order.
        x[4::5] = x[3::5][: len(x[4::5])]
    return x


def _check(got, images, texts, owner, product=None):
    want = _reference(images, texts, owner, product)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("ties", [None, "integers", "twins"])
@pytest.mark.parametrize("multi_caption", [False, True])
@pytest.mark.parametrize("chunk", [7, None])  # several blocks (pair scores first, from strips), or one
def test_matches_independent_computation(ties, multi_caption, chunk):
    rng = np.random.default_rng(3)
    images = _embeddings(rng, 40, 6, ties)
    if multi_caption:
        owner = np.concatenate([np.arange(35), rng.integers(0, 35, 60)])  # 5 images have no caption
    else:
        owner = np.arange(40)
    texts = _embeddings(rng, len(owner), 6, ties)
    got = retrieval_metrics(images, texts, owner, chunk_size=chunk)
    _check(got, images, texts, owner)
    assert got["num_images"] == 40 and got["num_texts"] == len(owner)


def test_twin_pairs_rank_as_documented():
    """300 images, 60 of them twins of another, one caption each, the caption a noisy copy of its image.

    (Seed 5 holds a relevant pair within float32 rounding of another score: _reference refuses such data.)
    """
    rng = np.random.default_rng(7)
    images = _embeddings(rng, 300, 16)
    images[240:] = images[:60]
    texts = images + 0.3 * rng.normal(size=images.shape).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    # The twins' captions are repeated too, after normalising: numpy may round the norms of equal rows apart.
    texts[240:] = texts[:60]
    for chunk in (None, 50):
        got = retrieval_metrics(images, texts, chunk_size=chunk)
        _check(got, images, texts, np.arange(300))
        # A twin image ties with the caption's own image: at best rank 2 (a tie never helps).
        assert got["t2i_R@1"] <= 100 * 180 / 300


def _twin_data(n: int, seed: int = 0):
    """``n`` images with twins at far-apart positions (first and last, second and middle) and their captions:
    one noisy copy each (the twins' captions twins too), plus a repeated caption of image 2 and image 3's
    caption again for image 4 (COCO repeats captions across images)."""
    rng = np.random.default_rng(seed)
    images = _embeddings(rng, n, 16)
    twins = [(0, n - 1), (1, n // 2)] if n >= 4 else [(0, n - 1)]
    for a, b in twins:
        images[b] = images[a]
    texts = images + 0.3 * rng.normal(size=images.shape).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)  # before copying: numpy may round equal rows apart
    for a, b in twins:
        texts[b] = texts[a]
    owner = np.arange(n)
    if n >= 5:
        texts = np.concatenate([texts, texts[[2, 3]]])
        owner = np.concatenate([owner, [2, 4]])
    return images, texts, owner, twins


def test_blockwise_product_breaks_naive_twins_but_not_the_reference():
    """The reference's own product, forced through differently shaped blocks, rounds twin rows apart; scoring
    each distinct row once keeps their ties, and the figures still match clip-tao's."""
    images, texts, owner, twins = _twin_data(129)
    scattered = _blockwise_product(images.astype(np.float64), texts.astype(np.float64))
    assert any(not np.array_equal(scattered[a], scattered[b]) for a, b in twins), "the blocks did not bite"
    shared, _ = _similarities(images, texts, _blockwise_product)
    for a, b in twins:
        assert np.array_equal(shared[a], shared[b]) and np.array_equal(shared[:, a], shared[:, b])
    got = retrieval_metrics(images, texts, owner)
    _check(got, images, texts, owner, _blockwise_product)
    _check(got, images, texts, owner)


@pytest.mark.parametrize("n", [2, 3, 17, 33, 65, 129])
def test_twins_tie_exactly_across_blocks_and_threads(n):
    """Twins far apart in the matrix, blocks of 1 to 129 captions (so twins fall on both sides of a block
    edge) and 1 or 2 threads (so the product is split differently): the same ranks and figures every time,
    twins ranked alike, all equal to the reference."""
    images, texts, owner, twins = _twin_data(n, seed=n)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for chunk in (None, 1, 2, 7, 16, 64, 129):
                runs.append(compute_retrieval(images, texts, owner, chunk_size=chunk))
    finally:
        torch.set_num_threads(threads)
    first = runs[0]
    for run in runs[1:]:
        assert run.figures == first.figures
        assert np.array_equal(run.t2i_ranks, first.t2i_ranks) and np.array_equal(run.i2t_ranks, first.i2t_ranks)
    for a, b in twins:  # caption a and b are twins, and so are their images
        assert first.t2i_ranks[a] == first.t2i_ranks[b] and first.i2t_ranks[a] == first.i2t_ranks[b]
    _check(first.figures, images, texts, owner)


def test_figures_do_not_depend_on_row_order_or_zero_padding():
    """The same data in another order, or with zero columns appended (another inner dimension, other kernel
    blocks): every query keeps its rank."""
    images, texts, owner, _ = _twin_data(65, seed=4)
    base = compute_retrieval(images, texts, owner, chunk_size=16)
    _check(base.figures, images, texts, owner)
    rng = np.random.default_rng(1)
    image_order, text_order = rng.permutation(len(images)), rng.permutation(len(texts))
    new_index = np.argsort(image_order)  # old image index -> its row in the permuted images
    moved = compute_retrieval(images[image_order], texts[text_order], new_index[owner[text_order]], chunk_size=16)
    assert np.array_equal(moved.t2i_ranks, base.t2i_ranks[text_order])
    assert np.array_equal(moved.i2t_ranks, base.i2t_ranks[image_order])
    for extra in (1, 113):
        padded = [np.pad(x, ((0, 0), (0, extra))) for x in (images, texts)]
        wide = compute_retrieval(*padded, owner, chunk_size=16)
        assert np.array_equal(wide.t2i_ranks, base.t2i_ranks) and np.array_equal(wide.i2t_ranks, base.i2t_ranks)
    for key, value in base.figures.items():
        assert moved.figures[key] == pytest.approx(value, rel=1e-12), key


def test_twins_are_found_by_their_bits_wherever_they_sit():
    """Twin detection (the basis of exact ties) is exact: twins at the two ends of a matrix longer than one
    key product, NaN twins, +0.0 and -0.0 kept apart, and two different rows whose keys collide."""
    from clip_tao.metrics import _exact_key_weights, first_equal_rows

    rng = np.random.default_rng(0)
    x = torch.as_tensor(_embeddings(rng, (1 << 14) + 40, 16))
    x[-1], x[-2], x[5] = x[0], x[(1 << 14) + 1], math.nan
    x[7] = x[5]
    x[9], x[10] = 0.0, -0.0
    first = first_equal_rows(x)
    want = torch.arange(len(x))
    want[[-1, -2, 7]] = torch.tensor([0, (1 << 14) + 1, 5])
    assert torch.equal(first, want)
    # Rows 0 and 1 differ in two coordinates by amounts whose weighted sums cancel: the same key.
    weights = _exact_key_weights(16).long()
    bits = torch.full((4, 16), 0x3F800000, dtype=torch.int32)  # 1.0
    bits[1, 0] += int(weights[1])
    bits[1, 1] -= int(weights[0])
    bits[2], bits[3] = bits[1], bits[0]
    rows = bits.view(torch.float32)
    assert float(bits[0].double() @ weights.double()) == float(bits[1].double() @ weights.double())
    assert first_equal_rows(rows).tolist() == [0, 1, 1, 0]
    # Rows too wide for an exact key (2**15 components) are sorted instead.
    assert _exact_key_weights(1 << 15) is None
    wide = torch.randn(3, 1 << 15)
    wide[2] = wide[0]
    assert first_equal_rows(wide).tolist() == [0, 1, 0] and first_equal_rows(wide[:2]) is None


@pytest.mark.parametrize("chunk", [None, 3])
def test_non_finite_scores_are_never_hits(chunk):
    """A diverged model (NaN embeddings) must score as badly as possible, never R@1 = 100."""
    nan = torch.full((10, 4), math.nan)
    figures = retrieval_metrics(nan, nan, chunk_size=chunk)
    for direction in ("i2t", "t2i"):
        assert figures[f"{direction}_R@1"] == 0.0 and figures[f"{direction}_MeanR"] == 10.0
        assert figures[f"{direction}_AUC"] == 0.0 and figures[f"{direction}_mAP"] == pytest.approx(10.0)
    # Some NaN/inf rows among good ones: each bad score counts against the model, the rest as usual.
    rng = np.random.default_rng(2)
    images = _embeddings(rng, 30, 8)
    owner = np.concatenate([np.arange(30), rng.integers(0, 30, 20)])
    texts = _embeddings(rng, 50, 8)
    images[[3, 17]] = np.nan
    texts[[5, 40]] = np.inf
    got = retrieval_metrics(images, texts, owner, chunk_size=chunk)
    _check(got, images, texts, owner)


@pytest.mark.parametrize("chunk", [1, 3, 64, 10_000])
def test_chunk_size_does_not_change_results(chunk):
    rng = np.random.default_rng(0)
    images, texts = _embeddings(rng, 50, 8), _embeddings(rng, 50, 8)
    got = retrieval_metrics(images, texts, chunk_size=chunk)
    _check(got, images, texts, np.arange(50))  # also: no comparison that rounding could decide, so ...
    assert got == retrieval_metrics(images, texts, chunk_size=50)  # ... other block shapes give the same counts


def test_perfect_and_all_tied_embeddings():
    eye = torch.eye(20)
    perfect = retrieval_metrics(eye, eye)
    assert perfect["t2i_R@1"] == perfect["i2t_R@1"] == 100.0 and perfect["t2i_MedR"] == 1.0
    assert perfect["t2i_AUC"] == 1.0
    same = torch.ones(20, 4) / 2
    tied = retrieval_metrics(same, same)
    assert tied["t2i_R@1"] == 0.0 and tied["t2i_MeanR"] == 20.0  # a tie never helps
    assert tied["t2i_AUC"] == 0.5


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="pass text_to_image"):
        retrieval_metrics(torch.eye(3), torch.eye(4)[:, :3])
    with pytest.raises(ValueError, match="image indices"):
        retrieval_metrics(torch.eye(3), torch.eye(3), [0, 1, 5])

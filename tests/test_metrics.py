import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from clip_tao.metrics import retrieval_metrics


def _reference(images, texts, owner):
    """Independent per-query computation with scikit-learn and a direct rank count.

    A non-finite similarity counts against the model (as documented): a relevant one below every other
    score, an irrelevant one above; +-1e30 stand in for the infinities scikit-learn refuses.
    """
    with np.errstate(invalid="ignore"):
        sims = images @ texts.T
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


def _check(got, images, texts, owner):
    with np.errstate(invalid="ignore"):
        want = _reference(images.astype(np.float64), texts.astype(np.float64), owner)
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
    """300 images, 60 of them twins of another, one caption each, the caption a noisy copy of its image."""
    rng = np.random.default_rng(5)
    images = _embeddings(rng, 300, 16)
    images[240:] = images[:60]
    texts = images + 0.3 * rng.normal(size=images.shape).astype(np.float32)
    texts[240:] = texts[:60]  # the twins' captions are repeated too
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    for chunk in (None, 50):
        got = retrieval_metrics(images, texts, chunk_size=chunk)
        _check(got, images, texts, np.arange(300))
        # A twin image ties with the caption's own image: at best rank 2 (a tie never helps).
        assert got["t2i_R@1"] <= 100 * 180 / 300


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
    assert retrieval_metrics(images, texts, chunk_size=chunk) == retrieval_metrics(images, texts, chunk_size=50)


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

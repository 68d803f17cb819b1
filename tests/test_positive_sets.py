"""Exact figures for queries with sets of relevant items (TAO's PAS queries), against scikit-learn per query."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from clip_tao.metrics import compute_retrieval
from clip_tao.positive_sets import rank_positive_sets


def _reference(similarities: np.ndarray, positives) -> dict[str, float]:
    """Per query with scikit-learn and a direct count; a non-finite similarity against the model (a relevant one
    below every score, an irrelevant one above: +-1e30 stand in for what scikit-learn refuses)."""
    ranks, aps, aucs = [], [], []
    for scores, members in zip(similarities, positives):
        relevant = np.zeros(len(scores), dtype=bool)
        relevant[list(members)] = True
        scores = np.where(np.isfinite(scores), scores, np.where(relevant, -1e30, 1e30))
        ranks.append(1 + int(((scores >= scores[relevant].max()) & ~relevant).sum()))  # ties pessimistic
        aps.append(average_precision_score(relevant, scores))
        aucs.append(roc_auc_score(relevant, scores) if not relevant.all() else math.nan)
    ranks = np.array(ranks)
    out = {f"R@{k}": (ranks <= k).mean() * 100 for k in (1, 5, 10)}
    out.update(mAP=np.mean(aps) * 100, MedR=np.median(ranks), MeanR=ranks.mean(), AUC=np.nanmean(aucs))
    return out


def _assert_equal(got: dict, want: dict):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def _random_sets(rng, num_queries, num_gallery, most):
    return [set(rng.choice(num_gallery, size=rng.integers(1, most + 1), replace=False).tolist())
            for _ in range(num_queries)]  # fmt: skip


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_tie_heavy_sets_match_scikit_learn(chunk):
    """Small-integer embeddings: every similarity is an exact integer whatever the kernel, so many relevant and
    irrelevant items tie and the rule decides (ties rank against the model; AP and AUC as scikit-learn)."""
    rng = np.random.default_rng(0)
    queries = rng.integers(-2, 3, size=(45, 6)).astype(np.float32)
    gallery = rng.integers(-2, 3, size=(70, 6)).astype(np.float32)
    positives = _random_sets(rng, 45, 70, 30)
    positives[0] = set(range(70))  # every item relevant: no AUC, AP 1
    got = rank_positive_sets(queries, gallery, positives, chunk_size=chunk)
    _assert_equal(got.figures, _reference(queries.astype(np.float64) @ gallery.T.astype(np.float64), positives))
    assert got.aps[0] == 1 and math.isnan(got.aucs[0]) and got.figures["num_queries"] == 45


def test_twin_images_tie_exactly_wherever_they_sit():
    """Repeated gallery images (bit-identical embeddings) at positions a kernel may round differently score the
    same; a twin of a relevant image that is itself irrelevant ranks before it."""
    rng = np.random.default_rng(2)  # a seed without near ties (checked below)
    gallery = rng.normal(size=(150, 32)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    gallery[7::11] = gallery[3]  # one image repeated all over the gallery
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    queries[5] = gallery[3]  # its best items are the twins
    positives = _random_sets(rng, 20, 150, 6)
    positives[5] = {3}  # the original is relevant, its copies are not: they all tie with it, so rank 1 + copies
    copies = len(range(7, 150, 11))
    # The reference scores each distinct row once, so twins share one value by construction.
    distinct, inverse = np.unique(gallery.view(np.uint32), axis=0, return_inverse=True)
    similarities = (queries.astype(np.float64) @ distinct.view(np.float32).astype(np.float64).T)[:, inverse.ravel()]
    _assert_no_near_ties(similarities, inverse.ravel(), positives)
    for chunk in (3, None):
        got = rank_positive_sets(queries, gallery, positives, chunk_size=chunk)
        assert got.ranks[5] == 1 + copies
        _assert_equal(got.figures, _reference(similarities, positives))


def _assert_no_near_ties(similarities, item_of, positives):
    """Apart from twins, no relevant item's similarity is within float32 rounding (about 32 x 2**-24 here) of
    another item's: the data, not the kernel, decides every comparison the figures depend on."""
    for row, members in zip(similarities, positives):
        for member in members:
            others = row[item_of != item_of[member]]
            assert np.abs(others - row[member]).min() > 1e-5, "near tie in the data: change the seed"


def test_non_finite_similarities_count_against_the_model():
    rng = np.random.default_rng(2)
    queries = rng.integers(-2, 3, size=(20, 4)).astype(np.float32)
    gallery = rng.integers(-2, 3, size=(30, 4)).astype(np.float32)
    gallery[4, 0] = np.nan  # one image's similarities are all NaN
    gallery[9, 1] = np.inf  # and one's are infinite (or NaN where the query has a zero)
    queries[3, :] = np.nan  # one query is NaN against everything: it finds nothing
    positives = _random_sets(rng, 20, 30, 6)
    positives[0] |= {4}
    positives[1] = {9}
    with np.errstate(invalid="ignore"):
        similarities = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    got = rank_positive_sets(queries, gallery, positives, chunk_size=6)
    _assert_equal(got.figures, _reference(similarities, positives))
    assert got.ranks[3] == 30 - len(positives[3]) + 1 and got.aucs[3] == 0
    assert got.ranks[1] == 30  # its only relevant image is non-finite: last


def test_one_relevant_item_a_query_equals_the_paired_metrics():
    """With one relevant image a caption, the figures are compute_retrieval's t2i figures (another counting path)."""
    rng = np.random.default_rng(3)
    images = rng.integers(-3, 4, size=(50, 8)).astype(np.float32)
    texts = rng.integers(-3, 4, size=(80, 8)).astype(np.float32)
    owner = rng.integers(0, 50, size=80)
    paired = compute_retrieval(images, texts, owner).figures
    got = rank_positive_sets(texts, images, [{int(o)} for o in owner]).figures
    for name in ("R@1", "R@5", "R@10", "mAP", "MedR", "MeanR", "AUC"):
        assert got[name] == pytest.approx(paired[f"t2i_{name}"], rel=1e-12), name


def test_bad_positive_sets_are_refused():
    x = torch.eye(4)
    with pytest.raises(ValueError, match="query 1 has no relevant gallery item"):
        rank_positive_sets(x, x, [{0}, set(), {1}, {2}])
    with pytest.raises(ValueError, match=r"query 0: relevant indices must lie in \[0, 4\)"):
        rank_positive_sets(x, x, [{4}, {0}, {1}, {2}])
    with pytest.raises(ValueError, match="3 positive sets for 4 queries"):
        rank_positive_sets(x, x, [{0}, {1}, {2}])
    with pytest.raises(ValueError, match="need"):
        rank_positive_sets(x, torch.eye(3), [{0}] * 4)

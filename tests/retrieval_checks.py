"""Comparing retrieval between two backends without relying on how either rounds.

Two backends (PyTorch, ONNX Runtime) compute embeddings a little apart (about 1e-6). A query's rank can
differ between them only where another score lies within that distance of a relevant one; everywhere else
the data decides it. :func:`compare_backends` measures the distance, finds such queries and checks that
every other query ranks alike. Twins (repeated captions) are encoded once, so they tie exactly in both.
"""

from __future__ import annotations

import numpy as np
import torch

from clip_tao.config import load_experiment
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.distributed import DistContext
from clip_tao.engine.model_setup import build_encoder
from clip_tao.metrics import compute_retrieval
from clip_tao.tasks.evaluate import _retrieval_collection, _retrieval_embeddings


def evaluation_embeddings(spec, overrides) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image and caption embeddings as ``clip-tao evaluate`` computes them, and each caption's image."""
    cfg = load_experiment(spec, overrides)
    model, device = build_encoder(cfg, "evaluate")
    one_process = DistContext(0, 1, 0, device)
    images, texts, owner, _ = _retrieval_embeddings(cfg, model, device, resolve_precision("fp32", device),
                                                    _retrieval_collection(cfg), one_process)  # fmt: skip
    return images, texts, owner


def near_ties(images, texts, owner, distance) -> tuple[set[int], set[int]]:
    """Queries (i2t image indices, t2i caption indices) with another score within ``distance`` of a relevant
    one; scores shared with a twin (a bit-identical row) tie exactly and do not count."""
    sims = (images.double() @ texts.double().T).numpy()
    i2t, t2i = set(), set()
    for caption, image in enumerate(owner.tolist()):
        score = sims[image, caption]
        row = np.abs(sims[image] - score)
        row[(texts == texts[caption]).all(1).numpy()] = np.inf
        column = np.abs(sims[:, caption] - score)
        column[(images == images[image]).all(1).numpy()] = np.inf
        if row.min() <= distance:
            i2t.add(image)
        if column.min() <= distance:
            t2i.add(caption)
    return i2t, t2i


def compare_backends(ours, theirs) -> bool:
    """``ours`` / ``theirs``: ``(images, texts, owner)`` of two backends. Every query that rounding cannot
    decide ranks alike in both; returns whether that is every query (then the figures must be equal)."""
    (images, texts, owner), (other_images, other_texts, other_owner) = ours, theirs
    assert torch.equal(owner, other_owner)
    for backend_texts in (texts, other_texts):  # twins: bit-identical rows in each backend, the same ones
        assert len(torch.unique(backend_texts, dim=0)) == len(torch.unique(texts, dim=0))
    # Each score moves by at most this between the backends, so a comparison by at most twice it.
    distance = 2 * float((images @ texts.T - other_images @ other_texts.T).abs().max()) + 1e-7
    assert distance < 1e-4, f"the backends' similarities differ by {distance / 2:.2g}"
    i2t_close, t2i_close = near_ties(images, texts, owner, distance)
    a, b = compute_retrieval(images, texts, owner), compute_retrieval(other_images, other_texts, owner)
    for ranks, other, close in ((a.i2t_ranks, b.i2t_ranks, i2t_close), (a.t2i_ranks, b.t2i_ranks, t2i_close)):
        decided = np.ones(len(ranks), bool)
        decided[sorted(close)] = False
        assert np.array_equal(ranks[decided], other[decided])
    if i2t_close or t2i_close:
        print(f"queries within {distance:.1e} of a tie: i2t {sorted(i2t_close)}, t2i {sorted(t2i_close)}")
    return not i2t_close and not t2i_close

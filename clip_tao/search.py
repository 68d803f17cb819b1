"""Nearest images to query embeddings: exact inner-product search, by PyTorch or by a saved FAISS index.

Both are exact (FAISS ``IndexFlatIP``): FAISS adds a saved index and multi-threaded BLAS search that
large collections load once instead of re-normalising and re-copying the embeddings every run.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from clip_tao.errors import NotAvailableError
from clip_tao.io.atomic import atomic_path

log = logging.getLogger(__name__)


class ImageIndex:
    """``search(queries [Q, D], k) -> (scores [Q, k], indices [Q, k])`` over ``embeddings`` ``[N, D]``."""

    def __init__(self, embeddings: np.ndarray, use_faiss: bool = False, index_file: str | None = None):
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.faiss_index = _faiss_index(self.embeddings, index_file) if use_faiss else None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if self.faiss_index is not None:
            return self.faiss_index.search(queries, k)
        scores, indices = [], []
        gallery = torch.from_numpy(self.embeddings)
        for start in range(0, len(queries), 256):  # bounded memory: 256 x N similarities at a time
            sims = torch.from_numpy(queries[start : start + 256]) @ gallery.T
            top = sims.topk(k, dim=1)
            scores.append(top.values.numpy())
            indices.append(top.indices.numpy())
        return np.concatenate(scores), np.concatenate(indices)


def _faiss_index(embeddings: np.ndarray, index_file: str | None):
    """Load ``index_file`` when it matches the embeddings, else build it (and save it there)."""
    try:
        import faiss
    except ImportError:
        raise NotAvailableError(
            "faiss is not installed: pip install faiss-cpu, or raise inference.faiss_min_images"
        ) from None
    if index_file and os.path.isfile(index_file):
        index = faiss.read_index(index_file)
        if index.ntotal == embeddings.shape[0] and index.d == embeddings.shape[1]:
            log.info("FAISS index loaded from %s", index_file)
            return index
        log.info("%s does not match the embeddings: rebuilding it", index_file)
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    if index_file:
        with atomic_path(index_file) as tmp:
            faiss.write_index(index, tmp)
        log.info("FAISS index of %d images saved to %s", index.ntotal, index_file)
    return index

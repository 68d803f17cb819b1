"""Search a built FAISS index, optionally re-scoring its candidates exactly from the embeddings file.

Re-ranking (``rerank_factor`` > 1) asks the index for ``k x rerank_factor`` candidates and orders them by
their exact cosine, read from the embeddings file (memory-mapped ``.npy`` or ``.h5`` slices): compressed
indexes find the right neighbours among their candidates far more often than in the right order, and the
full vectors stay on disk.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from clip_tao.errors import DataError, NotAvailableError
from clip_tao.index.source import EmbeddingSource

log = logging.getLogger(__name__)

INDEX_NAME, REPORT_NAME = "index.faiss", "index_report.json"


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise NotAvailableError("faiss is not installed: pip install faiss-cpu") from None
    return faiss


class IndexSearcher:
    """``search(queries [Q, D], k) -> (scores [Q, k], ids [Q, k])``, best first; ``-1`` ids where none was found."""

    def __init__(self, index, source: EmbeddingSource | None = None, rerank_factor: int = 1):
        self.index = index
        self.source = source
        self.rerank_factor = rerank_factor if source is not None else 1

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def set_params(self, params: dict) -> None:
        """FAISS search parameters by name (``nprobe``, ``efSearch``, ``quantizer_efSearch``)."""
        space = import_faiss().ParameterSpace()
        for name, value in params.items():
            space.set_index_parameter(self.index, name, value)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        fetch = min(k * self.rerank_factor, len(self))
        scores, ids = self.index.search(queries, fetch)
        if fetch > k:
            scores, ids = self._rerank(queries, ids, k)
        return scores[:, :k], ids[:, :k]

    def _rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.source.rows(ids.clip(min=0).reshape(-1)).reshape(*ids.shape, -1)
        exact = np.einsum("qfd,qd->qf", vectors, queries)
        exact[ids < 0] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(ids, order, 1)

    def range_search(self, queries: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FAISS's range search: ``(lims [Q+1], scores, ids)``, the ids of query ``i`` at ``lims[i]:lims[i+1]``."""
        return self.index.range_search(np.ascontiguousarray(queries, dtype=np.float32), float(radius))


def load_index(index_file: str, embeddings_file: str | None = None, key: str = "inference.index_file"):
    """``(searcher, report, source)`` of an index written by ``clip-tao index``, with its tuned search settings.

    ``embeddings_file`` (default: the one the index was built from) gives the image paths and the vectors
    for re-ranking.
    """
    if not os.path.isfile(index_file):
        raise DataError(f"{key}={index_file!r} does not exist: build it with clip-tao index")
    report_file = os.path.join(os.path.dirname(index_file), REPORT_NAME)
    report = {}
    if os.path.isfile(report_file):
        with open(report_file, encoding="utf-8") as f:
            report = json.load(f)
    embeddings_file = embeddings_file or report.get("embeddings_file")
    if not embeddings_file:
        raise DataError(f"{key}={index_file!r} has no {REPORT_NAME} beside it: give the embeddings file too")
    source = EmbeddingSource(embeddings_file, key.rsplit(".", 1)[0] + ".image_embeddings_file")
    faiss = import_faiss()
    try:
        index = faiss.read_index(index_file)
    except RuntimeError as exc:
        raise DataError(f"{key}={index_file!r} is not a FAISS index ({str(exc).splitlines()[0]})") from None
    if index.ntotal != source.count or index.d != source.dim:
        raise DataError(
            f"{key}={index_file!r} indexes {index.ntotal:,} x {index.d} vectors but {embeddings_file!r} holds "
            f"{source.count:,} x {source.dim}: rebuild the index with clip-tao index"
        )
    searcher = IndexSearcher(index, source, int(report.get("rerank_factor", 1)))
    searcher.set_params(report.get("search_params", {}))
    log.info("index %s (%s, %d vectors) loaded", index_file, report.get("index_key", "?"), index.ntotal)
    return searcher, report, source


def exact_searcher(source: EmbeddingSource, chunk_rows: int = 65536) -> IndexSearcher:
    """An exact (flat) index of the whole file, filled chunk by chunk: for collections that fit in memory."""
    index = import_faiss().IndexFlatIP(source.dim)
    for _, block in source.chunks(chunk_rows):
        index.add(block)
    return IndexSearcher(index, source, 1)

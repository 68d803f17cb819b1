"""Build a FAISS index from an embeddings file in bounded memory, tune it, and measure it.

Trained on a random sample, filled chunk by chunk. The file's last rows are held out: they are added to
the index only after they have served as queries, so that they measure the index as new queries would
(a query that is itself in the index is found far too easily by a graph index). Each is searched against
exact search over the rest of the file, streamed. The search setting (``nprobe`` for IVF, ``efSearch`` for
HNSW) is the cheapest that reaches the target recall@10.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from clip_tao.index.choose import IndexPlan
from clip_tao.index.searcher import IndexSearcher, import_faiss
from clip_tao.index.source import EmbeddingSource

log = logging.getLogger(__name__)

K = 10  # recall@10
LATENCY_QUERIES = 200


@dataclass
class Measured:
    """One search setting's recall@10 and single-query latency."""

    params: dict
    recall: float
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict:
        return {
            "params": self.params,
            "recall_at_10": round(self.recall, 4),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        }


def held_out(n: int, num_queries: int) -> int:
    """How many of the file's last rows are held out as queries (at most a fifth of the file)."""
    return max(1, min(num_queries, n // 5)) if n > 1 else 0


def sample_train_ids(rows: int, train_size: int, seed: int) -> np.ndarray:
    """Sorted training rows drawn from the first ``rows``; O(sample) memory, not O(rows)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=min(rows, train_size), replace=False))


def new_index(source: EmbeddingSource, plan: IndexPlan, train_ids: np.ndarray):
    faiss = import_faiss()
    index = faiss.index_factory(source.dim, plan.key, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = source.rows(train_ids)
        empty = ~sample.any(axis=1)  # rows that were NaN or zero
        if empty.any():
            sample = sample[~empty]
        log.info("training %s on %d vectors", plan.key, len(sample))
        index.train(sample)
    return index


def fill(index, source: EmbeddingSource, start: int, stop: int, chunk_rows: int) -> None:
    """Add rows ``start:stop`` in chunks (row numbers are FAISS's ids, so in order)."""
    with tqdm(total=stop - start, desc="add vectors", unit="vec", unit_scale=True, leave=False) as bar:
        for _, block in source.chunks(chunk_rows, start, stop):
            index.add(block)
            bar.update(len(block))


def exact_neighbours(source: EmbeddingSource, queries: np.ndarray, k: int, chunk_rows: int, stop: int) -> np.ndarray:
    """Ids ``[Q, k]`` of each query's ``k`` best rows ``0:stop`` by exact inner product, streamed in chunks."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    chunks = tqdm(source.chunks(chunk_rows, 0, stop), total=-(-stop // chunk_rows), desc="exact search", leave=False)
    for start, block in chunks:
        scores = queries @ block.T
        ids = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
        scores, ids = np.concatenate([best_scores, scores], 1), np.concatenate([best_ids, ids], 1)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else np.argsort(-scores, 1)
        best_scores, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, 1)


def found(ids: np.ndarray, k: int) -> list[list[int]]:
    """Each row's first ``k`` ids that are not missing (-1)."""
    return [[int(i) for i in row if i >= 0][:k] for row in ids]


def recall_at_k(found: list[list[int]], truth: list[list[int]], k: int = K) -> float:
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth))
    return hits / max(sum(min(k, len(t)) for t in truth), 1)


def measure(searcher: IndexSearcher, queries: np.ndarray, truth: list[list[int]]) -> tuple[float, float, float]:
    """``(recall@10, p50 ms, p99 ms)``: recall over all queries in one call, latency one query at a time."""
    _, ids = searcher.search(queries, K)
    recall = recall_at_k(found(ids, K), truth)
    times = []
    for q in queries[:LATENCY_QUERIES]:
        start = time.perf_counter()
        searcher.search(q[None], K)
        times.append((time.perf_counter() - start) * 1000)
    return recall, round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3)


def search_settings(plan: IndexPlan, index) -> list[dict]:
    """Search settings to try, cheapest first."""
    if plan.kind == "hnsw":
        return [{"efSearch": ef} for ef in (16, 32, 64, 128, 256, 512)]
    if plan.nlist:
        nprobes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= plan.nlist]
        if "HNSW" in plan.key.split(",")[0]:  # the coarse quantizer is a graph too
            return [{"nprobe": p, "quantizer_efSearch": max(64, 2 * p)} for p in nprobes]
        return [{"nprobe": p} for p in nprobes]
    return [{}]


def tune(
    searcher: IndexSearcher, plan: IndexPlan, queries: np.ndarray, truth: list[list[int]], target_recall: float,
) -> tuple[Measured, list[Measured]]:  # fmt: skip
    """The cheapest setting that reaches ``target_recall`` (else the best one), and every setting tried."""
    tried = []
    for params in search_settings(plan, searcher.index):
        searcher.set_params(params)
        tried.append(Measured(params, *measure(searcher, queries, truth)))
        if tried[-1].recall >= target_recall:
            break
        if len(tried) >= 3 and tried[-1].recall <= tried[-3].recall + 0.002:  # more probes no longer help
            break
    chosen = tried[-1] if tried[-1].recall >= target_recall else max(tried, key=lambda m: m.recall)
    searcher.set_params(chosen.params)
    return chosen, tried

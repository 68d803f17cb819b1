"""``clip-tao index``: an approximate FAISS index of an embeddings file, chosen for a memory budget and measured.

Writes ``results_dir/index/index.faiss`` and ``index_report.json``: the index chosen and why, its size
against flat's, build time, the search setting tuned on held-out queries, recall@10 against exact search
and single-query latency. ``inference`` (``inference.index_file``) and ``serve`` (``serve.index_file``)
search through it.
"""

from __future__ import annotations

import logging
import os
import time

from clip_tao.config.schema import ExperimentConfig, IndexConfig
from clip_tao.errors import ConfigError
from clip_tao.index.build import K, exact_neighbours, fill, found, held_out, new_index, sample_train_ids, tune
from clip_tao.index.choose import choose_index, flat_bytes, parse_memory, plan_for_key
from clip_tao.index.searcher import INDEX_NAME, REPORT_NAME, IndexSearcher, import_faiss
from clip_tao.index.source import EmbeddingSource
from clip_tao.io.atomic import atomic_path, write_json
from clip_tao.io.tables import format_table
from clip_tao.io.task_dir import failure_message, prepare_task_dir

log = logging.getLogger(__name__)


def check_index_config(c: IndexConfig) -> int:
    """The memory budget in bytes; :class:`ConfigError` for a setting that cannot work."""
    if not c.embeddings_file:
        raise ConfigError(
            "clip-tao index needs index.embeddings_file: an image_embeddings.h5 or a folder of .npy files"
        )
    if not 0 < c.target_recall <= 1:
        raise ConfigError(f"index.target_recall={c.target_recall} must be in (0, 1]")
    for key in ("num_queries", "chunk_size"):
        if getattr(c, key) < 1:
            raise ConfigError(f"index.{key}={getattr(c, key)} must be >= 1")
    if c.rerank_factor < 0 or c.exact_max_vectors < 0:
        raise ConfigError("index.rerank_factor and index.exact_max_vectors must be >= 0")
    return parse_memory(c.max_memory)


def run(cfg: ExperimentConfig) -> dict:
    c = cfg.index
    budget = check_index_config(c)
    source = EmbeddingSource(c.embeddings_file)
    out_dir, status = prepare_task_dir(cfg, "index")
    status.write("STARTED", f"Indexing {source.count:,} embeddings.")
    try:
        report = build_report(c, source, budget, out_dir)
    except (Exception, KeyboardInterrupt) as exc:
        status.write("FAILURE", failure_message("Indexing", exc))
        raise
    finally:
        source.close()
    status.write(
        "SUCCESS", "Index built.", kpi={"recall_at_10": report["recall_at_10"], "index_bytes": report["index_bytes"]}
    )
    return report


def build_report(c: IndexConfig, source: EmbeddingSource, budget: int, out_dir: str) -> dict:
    n, d = source.count, source.dim
    plan = plan_for_key(c.index_key, n, d) if c.index_key else choose_index(n, d, budget, c.exact_max_vectors)
    log.info("%s for %d x %d vectors: %s", plan.key, n, d, plan.reason)
    queries_from = n - held_out(n, c.num_queries)
    train_ids = sample_train_ids(queries_from, plan.train_size, c.seed)

    started = time.perf_counter()
    try:
        index = new_index(source, plan, train_ids)
        fill(index, source, 0, queries_from, c.chunk_size)
    except RuntimeError as exc:  # a malformed index_key, or too few vectors for it
        raise ConfigError(f"index.index_key={plan.key!r}: FAISS cannot build it ({str(exc).splitlines()[0]})") from None
    build_s = time.perf_counter() - started

    # The held-out last rows query the index before they join it.
    queries = source.read(queries_from, n)
    truth = found(exact_neighbours(source, queries, K, max(1024, c.chunk_size // 4), queries_from), K)
    rerank = c.rerank_factor or (8 if plan.kind == "ivf-pq" else 1)
    searcher = IndexSearcher(index, source, 1)
    plain, plain_tried = tune(searcher, plan, queries, truth, c.target_recall)
    chosen, tried = plain, plain_tried
    if rerank > 1:
        searcher.rerank_factor = rerank
        chosen, tried = tune(searcher, plan, queries, truth, c.target_recall)
    started = time.perf_counter()
    fill(index, source, queries_from, n, c.chunk_size)
    build_s += time.perf_counter() - started

    index_file = os.path.join(out_dir, INDEX_NAME)
    with atomic_path(index_file) as tmp:
        import_faiss().write_index(index, tmp)
    index_bytes = os.path.getsize(index_file)

    report = {
        "embeddings_file": os.path.abspath(c.embeddings_file),
        "num_vectors": n,
        "dim": d,
        "index_key": plan.key,
        "kind": plan.kind,
        "reason": plan.reason,
        "max_memory_bytes": budget,
        "index_bytes": index_bytes,
        "flat_bytes": flat_bytes(n, d),
        "memory_fraction_of_flat": round(index_bytes / flat_bytes(n, d), 4),
        "train_vectors": int(len(train_ids)),
        "build_seconds": round(build_s, 3),
        "num_queries": n - queries_from,
        "target_recall": c.target_recall,
        "search_params": chosen.params,
        "rerank_factor": rerank,
        "recall_at_10": round(chosen.recall, 4),
        "recall_at_10_without_rerank": round(plain.recall, 4),
        "latency_ms": {"p50": chosen.p50_ms, "p99": chosen.p99_ms},
        "settings_tried": [m.as_dict() for m in plain_tried]
        + ([m.as_dict() | {"rerank_factor": rerank} for m in tried] if rerank > 1 else []),
    }
    write_json(os.path.join(out_dir, REPORT_NAME), report)
    _print_summary(report, index_file)
    return report


def _print_summary(r: dict, index_file: str) -> None:
    print(f"\nIndex of {r['num_vectors']:,} x {r['dim']} vectors: {r['index_key']} ({r['reason']})")
    rows = [
        ["memory", f"{r['index_bytes']:,} bytes ({100 * r['memory_fraction_of_flat']:.1f} % of flat)"],
        ["build", f"{r['build_seconds']:.1f} s, trained on {r['train_vectors']:,} vectors"],
        ["search setting", ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "exact"],
        ["re-ranking", f"x{r['rerank_factor']} from the file" if r["rerank_factor"] > 1 else "none"],
        [
            "recall@10",
            f"{r['recall_at_10']:.4f} on the file's last {r['num_queries']} rows, held out (target {r['target_recall']})",
        ],
        ["latency", f"p50 {r['latency_ms']['p50']:.2f} ms, p99 {r['latency_ms']['p99']:.2f} ms a query"],
    ]
    print(format_table(["", ""], rows))
    print(f"index: {index_file}")

"""``clip-tao evaluate``: image-text retrieval figures in both directions on ``evaluate.datasets``."""

from __future__ import annotations

import logging
import os

from clip_tao.config.schema import ExperimentConfig
from clip_tao.data.loaders import build_eval_loader
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.embedding import embed_loader
from clip_tao.engine.model_setup import backend_name, build_encoder
from clip_tao.errors import DataError
from clip_tao.io.atomic import write_json
from clip_tao.io.tables import format_retrieval_table
from clip_tao.io.task_dir import prepare_task_dir
from clip_tao.metrics import retrieval_metrics

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict:
    out_dir, status = prepare_task_dir(cfg, "evaluate")
    status.write("STARTED", "Starting evaluation.")
    try:
        results = _evaluate(cfg, out_dir)
    except Exception as exc:
        status.write("FAILURE", f"Evaluation failed: {exc}")
        raise
    status.write("SUCCESS", "Evaluation finished.", kpi=results)
    return results


def _evaluate(cfg: ExperimentConfig, out_dir: str) -> dict:
    e = cfg.evaluate
    # TAO 7.0.1 falls back to the validation data when evaluate.datasets is not given.
    entries, section = (
        (e.datasets, "evaluate.datasets") if e.datasets else (cfg.dataset.val.datasets, "dataset.val.datasets")
    )
    if not entries:
        raise DataError("nothing to evaluate: set evaluate.datasets (or dataset.val.datasets) to image/caption folders")
    model, device = build_encoder(cfg, "evaluate")
    data = build_eval_loader(
        entries, section, model.preprocess, model.tokenizer, e.batch_size, e.num_workers, cfg.dataset.pin_memory
    )
    embeddings = embed_loader(model, data.loader, device, resolve_precision("fp32", device), desc="evaluate")
    if embeddings.image is None or len(embeddings.image) < 2:
        raise DataError(f"{section}: fewer than two decodable images; nothing to rank")
    metrics = retrieval_metrics(embeddings.image, embeddings.text, device=device)
    skipped = embeddings.skipped + data.scan_skipped
    results = {
        **metrics,
        "model_type": model.model_type,
        "backend": backend_name(e),
        "checkpoint": e.checkpoint,
        "skipped_files": dict(skipped),
    }
    write_json(os.path.join(out_dir, "results.json"), results)
    print(f"\nRetrieval on {metrics['num_images']} images / {metrics['num_texts']} captions ({model.model_type})")
    print(format_retrieval_table(metrics))
    if skipped:
        print(f"skipped: {skipped.summary()}")
    return results

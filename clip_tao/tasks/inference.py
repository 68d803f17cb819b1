"""``clip-tao inference``: TAO's ``image_embeddings.h5`` / ``text_embeddings.h5`` for images and prompts."""

from __future__ import annotations

import logging
import os

from clip_tao.config.schema import ExperimentConfig
from clip_tao.data.loaders import build_eval_loader
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.embedding import embed_loader, embed_texts
from clip_tao.engine.model_setup import build_encoder
from clip_tao.errors import ConfigError, DataError
from clip_tao.io.embeddings import write_embeddings
from clip_tao.io.tables import format_table
from clip_tao.io.task_dir import prepare_task_dir

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict:
    i = cfg.inference
    if not i.datasets and not i.text_file:
        raise ConfigError("inference needs inference.datasets (image folders), inference.text_file (prompts), or both")
    prompts = read_prompts(i.text_file) if i.text_file else []
    out_dir, status = prepare_task_dir(cfg, "inference")
    status.write("STARTED", "Starting inference.")
    try:
        summary = _infer(cfg, out_dir, prompts)
    except Exception as exc:
        status.write("FAILURE", f"Inference failed: {exc}")
        raise
    status.write("SUCCESS", "Inference finished.", kpi=summary)
    return summary


def read_prompts(path: str) -> list[str]:
    """One prompt a non-empty line, UTF-8."""
    if not os.path.isfile(path):
        raise DataError(f"inference.text_file {path!r} does not exist: give a text file with one prompt a line")
    try:
        with open(path, encoding="utf-8-sig") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as exc:
        raise DataError(f"inference.text_file {path!r} is not UTF-8 text") from exc
    if not prompts:
        raise DataError(f"inference.text_file {path!r} holds no prompts")
    return prompts


def _infer(cfg: ExperimentConfig, out_dir: str, prompts: list[str]) -> dict:
    i = cfg.inference
    # No checkpoint means the model's pretrained weights (TAO crashes here).
    model, device = build_encoder(cfg, "inference")
    precision = resolve_precision("fp32", device)
    summary: dict = {"model_type": model.model_type, "embedding_dim": model.embed_dim}
    rows = []
    if i.datasets:
        data = build_eval_loader(
            i.datasets, "inference.datasets", model.preprocess, None, i.batch_size, i.num_workers,
            cfg.dataset.pin_memory, require_captions=False,
        )  # fmt: skip
        result = embed_loader(model, data.loader, device, precision, desc="embed images", texts=False)
        if result.image is None:
            raise DataError("inference.datasets: no decodable image found")
        paths = [data.samples[k].image_path for k in result.indices.tolist()]
        path = os.path.join(out_dir, "image_embeddings.h5")
        write_embeddings(path, "image", result.image.numpy(), paths)
        summary["num_images"] = len(paths)
        summary["skipped_files"] = dict(result.skipped)
        rows.append(["images", len(paths), path])
    if prompts:
        embeddings = embed_texts(model, prompts, device, precision, i.batch_size)
        path = os.path.join(out_dir, "text_embeddings.h5")
        write_embeddings(path, "text", embeddings.numpy(), prompts)
        summary["num_texts"] = len(prompts)
        rows.append(["texts", len(prompts), path])
    print(f"\nEmbeddings ({model.model_type}, dimension {model.embed_dim})")
    print(format_table(["kind", "count", "file"], rows))
    return summary

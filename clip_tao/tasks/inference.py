"""``clip-tao inference``: TAO's ``image_embeddings.h5`` / ``text_embeddings.h5``, or a search over images.

``inference.mode: embed`` (TAO's) embeds ``inference.datasets`` and ``inference.text_file``.
``inference.mode: search`` ranks an image collection (``inference.image_embeddings_file`` or the embedded
``inference.datasets``) against every prompt of ``text_file`` and every image of ``query_images``, and writes
the top ``top_k`` of each as ``search_results.json`` and an offline HTML contact sheet.
``inference.mode: dedup`` groups near-duplicate images of the collection (``duplicates.csv`` and
``duplicates.html``). Both search through ``inference.index_file`` (built by ``clip-tao index``) when given.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from clip_tao.config.schema import ExperimentConfig, InferenceConfig
from clip_tao.data.classes import build_image_loader
from clip_tao.data.custom import IMAGE_EXTENSIONS, Sample
from clip_tao.data.loaders import build_eval_loader
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.embedding import embed_loader, embed_texts
from clip_tao.engine.model_setup import build_encoder
from clip_tao.errors import ConfigError, DataError
from clip_tao.index.dedup import SCORE_MARGIN, find_duplicate_groups, write_duplicates
from clip_tao.index.searcher import exact_searcher, load_index
from clip_tao.index.source import EmbeddingSource
from clip_tao.io.atomic import write_json
from clip_tao.io.contact_sheet import write_contact_sheet
from clip_tao.io.embeddings import read_embeddings, write_embeddings
from clip_tao.io.tables import format_table
from clip_tao.io.task_dir import failure_message, prepare_task_dir
from clip_tao.search import ImageIndex

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict:
    i = cfg.inference
    _check(i)
    prompts = read_prompts(i.text_file) if i.text_file else []
    out_dir, status = prepare_task_dir(cfg, "inference")
    status.write("STARTED", f"Starting inference ({i.mode}).")
    try:
        modes = {"search": _search, "dedup": _dedup, "embed": _embed}
        summary = modes[i.mode](cfg, out_dir, prompts)
    except (Exception, KeyboardInterrupt) as exc:
        status.write("FAILURE", failure_message("Inference", exc))
        raise
    status.write(
        "SUCCESS", "Inference finished.", kpi={k: v for k, v in summary.items() if isinstance(v, (int, float))}
    )
    return summary


def _check(i: InferenceConfig) -> None:
    if i.mode == "embed" and not i.datasets and not i.text_file:
        raise ConfigError("inference needs inference.datasets (image folders), inference.text_file (prompts), or both")
    if i.mode in ("search", "dedup") and not (i.datasets or i.image_embeddings_file or i.index_file):
        raise ConfigError(
            f"inference.mode={i.mode} needs a collection: inference.image_embeddings_file, inference.index_file "
            "or inference.datasets"
        )
    if i.mode == "dedup" and not 0 < i.dedup_threshold <= 1:
        raise ConfigError(f"inference.dedup_threshold={i.dedup_threshold} must be a cosine in (0, 1]")
    if i.mode == "search":
        if not i.text_file and not i.query_images:
            raise ConfigError(
                "inference.mode=search needs queries: inference.text_file (prompts) and/or inference.query_images"
            )
        if i.top_k < 1:
            raise ConfigError(f"inference.top_k={i.top_k} must be >= 1")


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


def _embed_collection(
    cfg: ExperimentConfig, model, device, precision, out_dir: str
) -> tuple[np.ndarray, list[str], str, dict]:
    """Embed ``inference.datasets`` into ``out_dir/image_embeddings.h5``: ``(embeddings, paths, file, skipped)``."""
    i = cfg.inference
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
    return result.image.numpy(), paths, path, dict(result.skipped)


def _embed(cfg: ExperimentConfig, out_dir: str, prompts: list[str]) -> dict:
    i = cfg.inference
    # No checkpoint means the model's pretrained weights (TAO crashes here).
    model, device = build_encoder(cfg, "inference")
    precision = resolve_precision("fp32", device)
    summary: dict = {"model_type": model.model_type, "embedding_dim": model.embed_dim}
    rows = []
    if i.datasets:
        _, paths, path, skipped = _embed_collection(cfg, model, device, precision, out_dir)
        summary["num_images"] = len(paths)
        summary["skipped_files"] = skipped
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


def _search(cfg: ExperimentConfig, out_dir: str, prompts: list[str]) -> dict:
    i = cfg.inference
    model, device = build_encoder(cfg, "inference")
    precision = resolve_precision("fp32", device)
    if i.index_file:
        index, _, source = load_index(i.index_file, i.image_embeddings_file)
        _check_dim(source.dim, model, "inference.index_file")
        paths, source = source.labels(), i.index_file
    elif i.image_embeddings_file:
        collection, paths, kind = read_embeddings(i.image_embeddings_file)
        if kind != "image":
            raise DataError(
                f"inference.image_embeddings_file {i.image_embeddings_file!r} holds {kind} embeddings, not images"
            )
        if collection.shape[1] != model.embed_dim:
            raise DataError(
                f"inference.image_embeddings_file has {collection.shape[1]}-d embeddings but {model.model_type} makes "
                f"{model.embed_dim}-d ones: embed the collection with the same model"
            )
        source = i.image_embeddings_file
    else:
        collection, paths, source, _ = _embed_collection(cfg, model, device, precision, out_dir)
    use_faiss = bool(i.index_file) or len(paths) >= i.faiss_min_images
    if not i.index_file:
        index = ImageIndex(collection, use_faiss=use_faiss, index_file=os.path.splitext(source)[0] + ".faiss")

    queries: list[tuple[str, str]] = []  # (kind, query)
    vectors = []
    if prompts:
        vectors.append(embed_texts(model, prompts, device, precision, i.batch_size).numpy())
        queries += [("text", p) for p in prompts]
    if i.query_images:
        samples = [Sample(p, None, p) for p in _query_image_paths(i.query_images)]
        loader = build_image_loader(
            samples, model.preprocess, i.batch_size, i.num_workers, "inference.num_workers", cfg.dataset.pin_memory
        )
        result = embed_loader(model, loader, device, precision, desc="embed query images", texts=False)
        if result.image is None:
            raise DataError("inference.query_images: no decodable image")
        vectors.append(result.image.numpy())
        queries += [("image", samples[k].image_path) for k in result.indices.tolist()]
    scores, indices = index.search(np.concatenate(vectors), i.top_k)

    results = [
        {
            "query": query,
            "kind": kind,
            "results": [
                {"rank": r + 1, "image_path": paths[j], "score": float(s)}
                for r, (j, s) in enumerate(zip(row_idx, row_scores))
                if j >= 0  # an approximate index may find fewer than top_k
            ],
        }
        for (kind, query), row_idx, row_scores in zip(queries, indices, scores)
    ]
    write_json(
        os.path.join(out_dir, "search_results.json"), {"collection": source, "top_k": i.top_k, "queries": results}
    )
    sheet = os.path.join(out_dir, "search_results.html")
    write_contact_sheet(sheet, f"Search over {len(paths)} images ({model.model_type})", results)
    print(f"\nSearch over {len(paths)} images ({'FAISS' if use_faiss else 'exact PyTorch'} index), top {i.top_k}")
    rows = [
        [q["kind"], q["query"][-50:], q["results"][0]["image_path"][-50:], q["results"][0]["score"]]
        for q in results[:20]
    ]
    print(format_table(["query", "text / image", "best match", "score"], rows))
    print(f"all results: {sheet}")
    return {"model_type": model.model_type, "num_images": len(paths), "num_queries": len(results), "faiss": use_faiss}


def _check_dim(dim: int, model, key: str) -> None:
    if dim != model.embed_dim:
        raise DataError(
            f"{key} has {dim}-d embeddings but {model.model_type} makes {model.embed_dim}-d ones: "
            "embed the collection with the same model"
        )


def _dedup(cfg: ExperimentConfig, out_dir: str, prompts: list[str]) -> dict:
    """Near-duplicate groups of the collection, through its index (or an exact one built here)."""
    i = cfg.inference
    if i.index_file:
        searcher, report, source = load_index(i.index_file, i.image_embeddings_file)
        kind = report.get("kind", "flat")
    else:
        if not i.image_embeddings_file:
            model, device = build_encoder(cfg, "inference")
            _, _, path, _ = _embed_collection(cfg, model, device, resolve_precision("fp32", device), out_dir)
        source = EmbeddingSource(i.image_embeddings_file or path, "inference.image_embeddings_file")
        searcher, kind = exact_searcher(source), "flat"
    paths = source.labels()
    groups = find_duplicate_groups(searcher, source, i.dedup_threshold, SCORE_MARGIN.get(kind, 0.1))
    table, sheet = write_duplicates(out_dir, groups, paths, f"Near-duplicates (cosine >= {i.dedup_threshold})")
    duplicates = sum(len(g.rows) - 1 for g in groups)
    print(f"\nNear-duplicates among {len(paths):,} images (cosine >= {i.dedup_threshold}, {kind} index)")
    rows = [[g, len(grp.rows), paths[grp.rows[0]][-50:], min(grp.similarity)] for g, grp in enumerate(groups[:20])]
    print(format_table(["group", "images", "first", "lowest similarity"], rows))
    print(f"{len(groups)} groups, {duplicates} duplicates: {table}, {sheet}")
    return {"num_images": len(paths), "num_groups": len(groups), "num_duplicates": duplicates}


def _query_image_paths(entries: list[str]) -> list[str]:
    paths = []
    for entry in entries:
        if os.path.isdir(entry):
            for root, dirs, files in os.walk(entry):
                dirs.sort()
                paths += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(entry):
            paths.append(entry)
        else:
            raise DataError(f"inference.query_images: {entry!r} is neither an image file nor a folder")
    if not paths:
        raise DataError("inference.query_images holds no images")
    return paths

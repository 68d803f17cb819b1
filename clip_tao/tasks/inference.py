"""``clip-tao inference``: TAO's ``image_embeddings.h5`` / ``text_embeddings.h5``, or a search over images.

``inference.mode: embed`` (TAO's) embeds ``inference.datasets`` (or the shards of ``inference.wds``) and
``inference.text_file``. The images are embedded part by part, by every process of a torchrun job, each part
written as soon as it is done (:mod:`clip_tao.io.embedding_parts`); a killed run started again continues from
the finished parts, and the parts are joined in order into ``image_embeddings.h5``.
``inference.mode: search`` ranks an image collection (``inference.image_embeddings_file`` or the embedded
``inference.datasets``) against every prompt of ``text_file`` and every image of ``query_images``, and writes
the top ``top_k`` of each as ``search_results.json`` and an offline HTML contact sheet.
``inference.mode: mine`` writes, for every image of ``inference.datasets``, the captions of other images it
scores highest, as negative files ready for ``negative_caption_dir`` (see :mod:`clip_tao.mining`).
``inference.mode: dedup`` groups near-duplicate images of the collection (``duplicates.csv`` and
``duplicates.html``). Search and dedup go through ``inference.index_file`` (built by ``clip-tao index``) when given.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import numpy as np

from clip_tao.config.schema import ExperimentConfig, InferenceConfig
from clip_tao.data.classes import build_image_loader
from clip_tao.data.custom import IMAGE_EXTENSIONS, Sample, SkipCounter
from clip_tao.data.loaders import build_eval_loader
from clip_tao.data.parts import build_collection, build_part_loader, check_not_empty, rank_parts, wds_given
from clip_tao.data.pas_metadata import metadata_guard
from clip_tao.deploy.files import find_files
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.distributed import DistContext, barrier, broadcast_object
from clip_tao.engine.embedding import embed_loader, embed_parts, embed_texts
from clip_tao.engine.model_setup import build_encoder
from clip_tao.engine.task_ranks import task_on_ranks
from clip_tao.errors import ConfigError, DataError, OutputError
from clip_tao.index.dedup import SCORE_MARGIN, find_duplicate_groups, write_duplicates
from clip_tao.index.searcher import exact_searcher, load_index
from clip_tao.index.source import EmbeddingSource
from clip_tao.io.atomic import atomic_path, write_json
from clip_tao.io.contact_sheet import write_contact_sheet
from clip_tao.io.embedding_parts import PartStore
from clip_tao.io.embeddings import read_embeddings, write_embeddings
from clip_tao.io.tables import format_table
from clip_tao.io.task_dir import failure_message
from clip_tao.mining import mine_negatives
from clip_tao.models.tokenizer import canonicalize_text
from clip_tao.search import ImageIndex

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict | None:
    """Embed (or search) in this process, or as one rank of a torchrun job: every rank embeds its share of
    the collection's parts; rank 0 joins them, embeds the prompts, searches and writes the summary."""
    i = cfg.inference
    _check(i)
    prompts = read_prompts(i.text_file) if i.text_file else []
    with task_on_ranks(cfg, "inference") as (ctx, out_dir, status):
        status.write("STARTED", f"Starting inference ({i.mode}).")
        try:
            if i.mode == "mine":  # one process: the candidates of every image are the whole collection's
                summary = _mine(cfg, out_dir) if ctx.is_main else None
            elif i.mode == "search":
                summary = _search(cfg, out_dir, prompts, ctx)
            elif i.mode == "dedup":
                summary = _dedup(cfg, out_dir, ctx)
            else:
                summary = _embed(cfg, out_dir, prompts, ctx)
        except (Exception, KeyboardInterrupt) as exc:
            status.write("FAILURE", failure_message("Inference", exc))
            raise
        if summary is None:  # a rank other than 0: its share is written
            return None
        kpi = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        status.write("SUCCESS", "Inference finished.", kpi=kpi)
        return summary


def _has_collection(i: InferenceConfig) -> bool:
    return bool(i.datasets) or wds_given(i.wds)


def _check(i: InferenceConfig) -> None:
    if i.mode == "embed" and not _has_collection(i) and not i.text_file:
        raise ConfigError(
            "inference needs inference.datasets (image folders) or inference.wds (shards), "
            "inference.text_file (prompts), or both"
        )
    if i.mode in ("search", "dedup") and not (_has_collection(i) or i.image_embeddings_file or i.index_file):
        raise ConfigError(
            f"inference.mode={i.mode} needs a collection: inference.image_embeddings_file, inference.index_file, "
            "inference.datasets or inference.wds"
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
    if i.mode == "mine":
        if not i.datasets:
            raise ConfigError("inference.mode=mine needs inference.datasets: image folders with their captions")
        if i.mine.negatives_per_image < 1:
            raise ConfigError(f"inference.mine.negatives_per_image={i.mine.negatives_per_image} must be >= 1")


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


def _embed_collection(cfg: ExperimentConfig, model, device, precision, out_dir: str, ctx: DistContext) -> dict | None:
    """Embed ``inference.datasets`` / ``inference.wds`` part by part into ``out_dir/image_embeddings.h5``
    (and clip-retrieval's folders with ``output_format: npy``), continuing from the finished parts of an
    interrupted run. Rank 0 gets ``{"file", "num_images", "skipped", "resumed_parts", ...}``, the others ``None``."""
    i = cfg.inference
    collection = build_collection(i.datasets, i.wds, "inference", i.batch_size, i.part_size, require_captions=False)
    check_not_empty(collection)
    store = _part_store(cfg, model, collection, out_dir, ctx.rank)
    kept = store.prepare() if ctx.is_main else 0
    barrier(ctx)  # the manifest is settled before any rank looks for finished parts
    finished = broadcast_object(ctx, store.finished() if ctx.is_main else None)
    todo = [p for p in collection.parts if p.index not in finished]
    mine = rank_parts(todo, ctx.rank, ctx.world_size)
    if ctx.is_main and kept:
        log.info("inference: %d of %d parts finished by an earlier run are kept", kept, len(collection.parts))
    loader = build_part_loader(collection, mine, model.preprocess, None, i.batch_size, i.num_workers,
                               "inference.num_workers", cfg.dataset.pin_memory)  # fmt: skip
    start = time.perf_counter()
    embed_parts(model, loader, device, precision, store.write, total=sum(map(collection.estimated_size, mine)),
                desc="embed images", progress=ctx.is_main)  # fmt: skip
    barrier(ctx)  # every part is written
    seconds = time.perf_counter() - start  # the slowest rank's share
    if not ctx.is_main:
        return None
    missing = sorted(set(range(len(collection.parts))) - store.finished())
    if missing:  # a process stopped without an error, or someone removed files: never join an incomplete set
        raise OutputError(
            f"{store.marker_dir}: part(s) {', '.join(map(str, missing[:5]))} of {len(collection.parts)} are missing "
            "after every process finished; run the same command again to embed them"
        )
    rows, skipped = store.totals()
    if rows == 0:
        raise DataError(f"{collection.section}: no decodable image found")
    path = os.path.join(out_dir, "image_embeddings.h5")
    start = time.perf_counter()
    store.join_h5(path, model.embed_dim)
    join_seconds = time.perf_counter() - start
    if i.output_format == "h5":
        store.remove_folder()  # the parts were only a means to the .h5
    skipped.update(collection.scan_skipped)
    return {"file": path, "num_images": rows, "skipped": skipped, "num_parts": len(collection.parts),
            "resumed_parts": kept, "embed_seconds": seconds, "join_seconds": join_seconds}  # fmt: skip


def _part_store(cfg: ExperimentConfig, model, collection, out_dir: str, rank: int) -> PartStore:
    """Where the parts go, and what they are computed from (a run of anything else never reuses them)."""
    i = cfg.inference
    markers = os.path.join(out_dir, "parts")
    data_dir = out_dir if i.output_format == "npy" else markers
    sources = hashlib.sha256("\n".join(collection.sources()).encode("utf-8")).hexdigest()
    weights = [_file_identity(i.checkpoint)] if i.checkpoint else []
    for path, ext, key in (
        (i.onnx_file, ".onnx", "inference.onnx_file"),
        (i.trt_engine, ".engine", "inference.trt_engine"),
    ):
        if path:  # a combined file, or the _vision / _text pair it names
            weights += [_file_identity(f) for f in sorted(find_files(path, ext, key).encoders.values())]
    manifest = {"model_type": model.model_type, "embedding_dim": model.embed_dim, "weights": weights,
                "pretrained_path": cfg.model.pretrained_path, "image_size": cfg.model.image_size,
                "max_num_patches": cfg.model.max_num_patches, "batch_size": i.batch_size,
                "parts": [[p.start, p.stop] for p in collection.parts] if collection.kind == "custom" else "shards",
                "sources": sources, "output_format": i.output_format}  # fmt: skip
    return PartStore(data_dir, markers, len(collection.parts), manifest, rank)


def _file_identity(path: str) -> list:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _embed(cfg: ExperimentConfig, out_dir: str, prompts: list[str], ctx: DistContext) -> dict | None:
    i = cfg.inference
    # No checkpoint means the model's pretrained weights (TAO crashes here).
    model, device = build_encoder(cfg, "inference", ctx.device)
    precision = resolve_precision("fp32", device)
    summary: dict = {"model_type": model.model_type, "embedding_dim": model.embed_dim}
    rows = []
    if _has_collection(i):
        images = _embed_collection(cfg, model, device, precision, out_dir, ctx)
        if images is None:
            return None
        summary.update(num_images=images["num_images"], skipped_files=dict(images["skipped"]),
                       num_processes=ctx.world_size, num_parts=images["num_parts"],
                       resumed_parts=images["resumed_parts"], embed_seconds=round(images["embed_seconds"], 3),
                       join_seconds=round(images["join_seconds"], 3))  # fmt: skip
        rows.append(["images", images["num_images"], images["file"]])
        if i.output_format == "npy":
            rows.append(["images (clip-retrieval)", images["num_images"], os.path.join(out_dir, "img_emb")])
    elif not ctx.is_main:
        return None
    if prompts:
        embeddings = embed_texts(model, prompts, device, precision, i.batch_size)
        path = os.path.join(out_dir, "text_embeddings.h5")
        write_embeddings(path, "text", embeddings.numpy(), prompts)
        summary["num_texts"] = len(prompts)
        rows.append(["texts", len(prompts), path])
    print(f"\nEmbeddings ({model.model_type}, dimension {model.embed_dim})")
    print(format_table(["kind", "count", "file"], rows))
    if summary.get("skipped_files"):
        print(f"skipped: {SkipCounter(summary['skipped_files']).summary()}")
    return summary


def _search(cfg: ExperimentConfig, out_dir: str, prompts: list[str], ctx: DistContext) -> dict | None:
    i = cfg.inference
    model, device = build_encoder(cfg, "inference", ctx.device)
    precision = resolve_precision("fp32", device)
    if i.index_file:
        if not ctx.is_main:  # the index holds the collection already: one process searches it
            return None
        index, _, source = load_index(i.index_file, i.image_embeddings_file)
        _check_dim(source.dim, model, "inference.index_file")
        paths, source = source.labels(), i.index_file
    else:
        if not i.image_embeddings_file:  # every rank embeds its share of the collection first
            images = _embed_collection(cfg, model, device, precision, out_dir, ctx)
            if images is None:
                return None
        elif not ctx.is_main:
            return None
        source = i.image_embeddings_file or images["file"]
        collection, paths, kind = read_embeddings(source)
    if i.image_embeddings_file and not i.index_file:
        if kind != "image":
            raise DataError(
                f"inference.image_embeddings_file {i.image_embeddings_file!r} holds {kind} embeddings, not images"
            )
        if collection.shape[1] != model.embed_dim:
            raise DataError(
                f"inference.image_embeddings_file has {collection.shape[1]}-d embeddings but {model.model_type} makes "
                f"{model.embed_dim}-d ones: embed the collection with the same model"
            )
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


def _mine(cfg: ExperimentConfig, out_dir: str) -> dict:
    i, m = cfg.inference, cfg.inference.mine
    model, device = build_encoder(cfg, "inference")
    if hasattr(model, "require"):  # a deployed backend must hold both encoders
        model.require("vision")
        model.require("text")
    precision = resolve_precision("fp32", device)
    try:
        data = build_eval_loader(i.datasets, "inference.datasets", model.preprocess, None, i.batch_size,
                                 i.num_workers, cfg.dataset.pin_memory)  # fmt: skip
    except DataError as exc:
        if "no usable" not in str(exc):
            raise
        raise DataError(f"inference.mode=mine needs captions to mine from: {exc}; set caption_dir") from None
    result = embed_loader(model, data.loader, device, precision, desc="embed images", texts=False)
    if result.image is None:
        raise DataError("inference.datasets: no decodable image found")
    samples = [data.samples[k] for k in result.indices.tolist()]
    candidates = sorted({c for s in data.samples for c in s.captions})
    if len(candidates) < 2:
        raise DataError("inference.datasets: fewer than two distinct captions; nothing to mine from")
    canonical = canonicalize_text if cfg.model.canonicalize_text else (lambda t: t)
    compatible = metadata_guard(samples, i.datasets, canonical, "inference.datasets")
    candidate_emb = embed_texts(model, candidates, device, precision, i.batch_size).numpy()
    negatives, guarded = mine_negatives(
        result.image.numpy(), [s.captions for s in samples], candidates, candidate_emb, m.negatives_per_image,
        m.max_similarity, canonical, use_faiss=len(candidates) >= i.faiss_min_images, compatible=compatible,
    )  # fmt: skip
    root = m.output_dir or os.path.join(out_dir, "negatives")
    folders = _write_negative_files(root, i.datasets, samples, negatives)
    counts = [len(n) for n in negatives]
    summary = {
        "model_type": model.model_type,
        "num_images": len(samples),
        "num_candidates": len(candidates),
        "negatives_written": sum(counts),
        "images_with_fewer_negatives": sum(c < m.negatives_per_image for c in counts),
        "guarded_own_caption": guarded["own_caption"],
        "guarded_above_max_similarity": guarded["above_max_similarity"],
        "guarded_metadata_compatible": guarded["metadata_compatible"],
        "attribute_metadata": compatible is not None,
        "skipped_files": dict(result.skipped + data.scan_skipped),
        "negative_caption_dirs": folders,
    }
    write_json(os.path.join(out_dir, "mining_summary.json"), summary)
    print(
        f"\nMined {m.negatives_per_image} hard negatives an image over {len(candidates)} captions ({model.model_type})"
    )
    rows = [[k.replace("_", " "), v] for k, v in summary.items() if isinstance(v, int) and not isinstance(v, bool)]
    print(format_table(["", "count"], rows))
    for index, folder in enumerate(folders):
        print(f"train on them: dataset.train.datasets[{index}].negative_caption_dir={folder}")
    return summary


def _write_negative_files(root: str, entries, samples: list[Sample], negatives) -> list[str]:
    """One file an image at its caption's relative path; a folder per dataset entry when there are several."""
    folders = [root if len(entries) == 1 else os.path.join(root, str(k)) for k in range(len(entries))]
    for sample, mined in zip(samples, negatives):
        if not mined:  # an empty file would be counted as a bad one by training
            continue
        index, rel = sample.key.split("/", 1)
        entry = entries[int(index)]
        path = os.path.join(folders[int(index)], os.path.splitext(rel)[0] + entry.caption_file_suffix)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(text.replace("\n", " ") + "\n" for text, _ in mined)
    return folders


def _check_dim(dim: int, model, key: str) -> None:
    if dim != model.embed_dim:
        raise DataError(
            f"{key} has {dim}-d embeddings but {model.model_type} makes {model.embed_dim}-d ones: "
            "embed the collection with the same model"
        )


def _dedup(cfg: ExperimentConfig, out_dir: str, ctx: DistContext) -> dict | None:
    """Near-duplicate groups of the collection, through its index (or an exact one built here). Several
    processes embed a collection together; one groups it."""
    i = cfg.inference
    path = i.image_embeddings_file
    if not i.index_file and not path:
        model, device = build_encoder(cfg, "inference", ctx.device)
        images = _embed_collection(cfg, model, device, resolve_precision("fp32", device), out_dir, ctx)
        if images is None:
            return None
        path = images["file"]
    elif not ctx.is_main:
        return None
    if i.index_file:
        searcher, report, source = load_index(i.index_file, i.image_embeddings_file)
        kind = report.get("kind", "flat")
    else:
        source = EmbeddingSource(path, "inference.image_embeddings_file")
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

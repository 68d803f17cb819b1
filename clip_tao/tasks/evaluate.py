"""``clip-tao evaluate``: image-text retrieval in both directions, or zero-shot classification.

Retrieval (TAO's): ``evaluate.datasets`` or the shards of ``evaluate.wds`` (falling back to ``dataset.val``),
one or many captions per image. Under torchrun every process embeds its share of the parts
(:mod:`clip_tao.data.parts`); rank 0 gathers them and computes the exact figures.
Classification (``evaluate.mode: classification``): a folder per class, prompts from templates.
Pairs (``evaluate.mode: pairs``): compositional accuracy on ``evaluate.pairs_file`` (see
:mod:`clip_tao.compositional`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from clip_tao.classification import DEFAULT_TEMPLATES, class_embeddings, classification_metrics
from clip_tao.compositional import pairs_accuracy, read_pairs_file
from clip_tao.config.schema import ExperimentConfig
from clip_tao.data.classes import build_image_loader, scan_labelled_images
from clip_tao.data.custom import Sample, SkipCounter
from clip_tao.data.parts import (
    Collection,
    build_collection,
    build_part_loader,
    rank_parts,
    samples_collection,
    wds_given,
)
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.distributed import DistContext, gather_to_main
from clip_tao.engine.embedding import embed_loader, embed_parts, embed_texts, share_equal_inputs
from clip_tao.engine.finite import check_embeddings
from clip_tao.engine.model_setup import backend_name, build_encoder
from clip_tao.engine.task_ranks import task_on_ranks
from clip_tao.errors import DataError
from clip_tao.io import plots
from clip_tao.io.atomic import atomic_path, write_json
from clip_tao.io.tables import format_retrieval_table, format_table
from clip_tao.io.tao_kpi import tao_retrieval_kpi
from clip_tao.io.task_dir import failure_message
from clip_tao.metrics import compute_retrieval
from clip_tao.pas import is_tao_kpi

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict | None:
    """Evaluate in this process, or as one rank of a torchrun job: every rank embeds its share of the parts,
    rank 0 gathers them in order and computes the exact figures (the others return ``None``)."""
    with task_on_ranks(cfg, "evaluate") as (ctx, out_dir, status):
        status.write("STARTED", f"Starting evaluation ({cfg.evaluate.mode}).")
        try:
            pas_file = _pas_pairs_file(cfg)
            if cfg.evaluate.mode == "classification":
                results = _classification(cfg, out_dir, ctx)
            elif cfg.evaluate.mode == "pairs":  # a few thousand lines: one process scores them
                results = _pairs(cfg, out_dir) if ctx.is_main else None
            elif pas_file is not None:  # TAO's PAS figures: one process
                results = _pas(cfg, out_dir, *pas_file) if ctx.is_main else None
            elif cfg.dataset.val.metadata_match_eval and not cfg.evaluate.datasets and not wds_given(cfg.evaluate.wds):
                results = _metadata_validation(cfg, out_dir) if ctx.is_main else None
            else:
                results = _retrieval(cfg, out_dir, ctx)
        except (Exception, KeyboardInterrupt) as exc:
            status.write("FAILURE", failure_message("Evaluation", exc))
            raise
        if results is None:
            return None
        kpi = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        kpi.update(tao_retrieval_kpi(kpi, "test"))  # TAO's test/... keys, fractions as strings
        kpi.update({f"test/{k}": str(v) for k, v in kpi.items() if is_tao_kpi(k)})  # as TAO's trainer.test
        status.write("SUCCESS", "Evaluation finished.", kpi=kpi)
        print(f"results: {os.path.join(out_dir, 'results.json')} (plots and status.json beside it)")
        return results


@dataclass
class _Gathered:
    """Every rank's parts, joined on rank 0 in part order: the rows of a one-process run."""

    image: torch.Tensor
    text: torch.Tensor | None
    indices: torch.Tensor  # dataset positions (image folders)
    extra_text: torch.Tensor | None  # further captions of multi-caption images, in row order
    extra_owner: torch.Tensor | None  # the row each belongs to
    skipped: SkipCounter
    text_ids: torch.Tensor | None = None  # token ids of ``text`` then ``extra_text`` (see share_equal_inputs)


def _embed_share(cfg, model, device, precision, collection, ctx, texts: bool, desc: str) -> _Gathered | None:
    """Embed this rank's parts (and their images' further captions); rank 0 gets every rank's, in order."""
    e = cfg.evaluate
    mine = rank_parts(collection.parts, ctx.rank, ctx.world_size)
    loader = build_part_loader(collection, mine, model.preprocess, model.tokenizer if texts else None, e.batch_size,
                               e.num_workers, "evaluate.num_workers", cfg.dataset.pin_memory)  # fmt: skip
    parts = []
    embed_parts(model, loader, device, precision, parts.append, texts=texts,
                total=sum(map(collection.estimated_size, mine)), desc=desc, progress=ctx.is_main,
                check_finite=False)  # fmt: skip
    extras = []
    for part in parts if texts and collection.samples else []:
        captions = [(c, int(k)) for k in part.indices for c in collection.samples[k].extra_captions]
        if captions:
            extra = [c for c, _ in captions]
            embedded = embed_texts(model, extra, device, precision, e.batch_size).numpy()
            ids = model.tokenizer(extra).cpu().numpy() if model.tokenizer is not None else None
            extras.append((part.part, embedded, np.array([k for _, k in captions], dtype=np.int64), ids))
    gathered = gather_to_main(ctx, (parts, extras))  # each rank's share goes to rank 0 only
    if gathered is None:
        return None
    parts = sorted((p for share, _ in gathered for p in share), key=lambda p: p.part)
    extras = sorted((x for _, share in gathered for x in share), key=lambda x: x[0])
    skipped = SkipCounter(collection.scan_skipped)
    for part in parts:
        skipped.update(part.skipped)
    image = torch.from_numpy(np.concatenate([p.image for p in parts]))
    with_text = [p.text for p in parts if p.text is not None]  # a part without any good image has none
    text = torch.from_numpy(np.concatenate(with_text)) if with_text else None
    indices = torch.from_numpy(np.concatenate([p.indices for p in parts]))
    check_embeddings(image, "image")  # on everything: the message counts all the bad rows
    check_embeddings(text, "text")
    extra_text = extra_owner = None
    ids = [p.text_ids for p in parts if p.text is not None]
    if extras:
        row_of = {int(k): row for row, k in enumerate(indices.tolist())}
        extra_text = torch.from_numpy(np.concatenate([x[1] for x in extras]))
        extra_owner = torch.tensor([row_of[int(k)] for x in extras for k in x[2]])
        ids += [x[3] for x in extras]
    shapes = {None if i is None else i.shape[1:] for i in ids}
    text_ids = torch.from_numpy(np.concatenate(ids)) if ids and None not in shapes and len(shapes) == 1 else None
    return _Gathered(image, text, indices, extra_text, extra_owner, skipped, text_ids)


def _retrieval_embeddings(cfg, model, device, precision, collection, ctx):
    """``(images, texts, owner, skipped)`` on rank 0 (``None`` elsewhere): every caption of every image and the
    image it belongs to. Repeated captions share one embedding (see :func:`share_equal_inputs`), so they tie
    exactly whichever batch position or backend computed them."""
    embeddings = _embed_share(cfg, model, device, precision, collection, ctx, texts=True, desc="evaluate")
    if embeddings is None:
        return None
    if len(embeddings.image) < 2:
        raise DataError(f"{collection.section}: fewer than two decodable images; nothing to rank")
    texts, owner = embeddings.text, torch.arange(len(embeddings.image))
    if embeddings.extra_text is not None:
        texts, owner = torch.cat([texts, embeddings.extra_text]), torch.cat([owner, embeddings.extra_owner])
    if embeddings.text_ids is not None:
        texts = share_equal_inputs(texts, embeddings.text_ids)
    return embeddings.image, texts, owner, embeddings.skipped


def _retrieval(cfg: ExperimentConfig, out_dir: str, ctx: DistContext) -> dict | None:
    e = cfg.evaluate
    model, device = build_encoder(cfg, "evaluate", ctx.device)
    if hasattr(model, "require"):  # a deployed backend must hold both encoders
        model.require("vision")
        model.require("text")
    collection = _retrieval_collection(cfg)
    precision = resolve_precision("fp32", device)
    embedded = _retrieval_embeddings(cfg, model, device, precision, collection, ctx)
    if embedded is None:
        return None
    images, texts, owner, skipped = embedded
    result = compute_retrieval(images, texts, owner, device=device)
    metrics = result.figures
    results = {
        **metrics,
        "model_type": model.model_type,
        "backend": backend_name(e),
        "checkpoint": e.checkpoint,
        "skipped_files": dict(skipped),
        "num_processes": ctx.world_size,
    }
    write_json(os.path.join(out_dir, "results.json"), results)
    ranks = {"i2t": result.i2t_ranks, "t2i": result.t2i_ranks}
    plots.recall_at_k_png(ranks, os.path.join(out_dir, "recall_at_k.png"))
    plots.rank_histogram_png(ranks, os.path.join(out_dir, "rank_histogram.png"))
    print(f"\nRetrieval on {metrics['num_images']} images / {metrics['num_texts']} captions ({model.model_type})")
    print(format_retrieval_table(metrics))
    if skipped:
        print(f"skipped: {skipped.summary()}")
    return results


def _pas_pairs_file(cfg: ExperimentConfig):
    """TAO 7.3's direct PAS evaluation: the first ``evaluate.datasets`` entry whose pairs file exists
    (``attribute_pairs_file``, else ``<stem>_pairs.json`` beside ``<stem>_list.txt``), as ``(entry, path)``."""
    from clip_tao.data.pas_metadata import pairs_file

    for i, entry in enumerate(cfg.evaluate.datasets):
        try:
            path = pairs_file(entry, "val", f"evaluate.datasets[{i}]")
        except DataError:
            continue
        if entry.attribute_pairs_file or os.path.isfile(path):
            return entry, path
    # As in TAO, the mode belongs to the direct PAS evaluation: without evaluate.datasets, evaluate scores
    # dataset.val (TAO 7.3's template spec sets a scalar mode with no datasets).
    if cfg.evaluate.datasets and cfg.evaluate.pas_ground_truth_mode != "paired_caption":
        raise DataError(
            f"evaluate.pas_ground_truth_mode={cfg.evaluate.pas_ground_truth_mode} needs an evaluate.datasets entry "
            "with a pairs file (attribute_pairs_file, or <stem>_pairs.json beside its <stem>_list.txt)"
        )
    return None


def _pas(cfg: ExperimentConfig, out_dir: str, entry, path: str) -> dict:
    """TAO's PAS text->image evaluation of one pairs file: its CSV files, and the figures as KPIs."""
    from clip_tao.data.custom import Sample
    from clip_tao.data.pas_metadata import load_metadata
    from clip_tao.pas import dataset_of, evaluate_pas, exact_figures, overall, write_pas_files

    e = cfg.evaluate
    mode = e.pas_ground_truth_mode
    with open(path, encoding="utf-8") as f:
        names = [row.get("unique_name", "") if isinstance(row, dict) else "" for row in json.load(f)]
    meta = load_metadata(path, names, True if mode == "scalar_plus_accessories" else None)
    model, device = build_encoder(cfg, "evaluate")
    precision = resolve_precision("fp32", device)
    first: dict[tuple, dict] = {}
    for row in meta.rows:
        first.setdefault((dataset_of(row), row["image_path"]), row)
    keys = list(first)
    samples = [
        Sample(os.path.join(entry.image_dir, first[k]["unique_name"]), None, f"0/{i}") for i, k in enumerate(keys)
    ]
    loader = build_image_loader(samples, model.preprocess, e.batch_size, e.num_workers, "evaluate.datasets")
    embedded = embed_loader(model, loader, device, precision, desc="PAS images", texts=False)
    if len(embedded.indices) != len(keys):
        raise DataError(f"{path}: {len(keys) - len(embedded.indices)} gallery images could not be read")
    images = {keys[int(i)]: v for i, v in zip(embedded.indices, torch.nn.functional.normalize(embedded.image, dim=-1))}
    captions = list(dict.fromkeys(row["caption"] for row in meta.rows))
    text = torch.nn.functional.normalize(embed_texts(model, captions, device, precision, e.batch_size), dim=-1)
    texts = dict(zip(captions, text))
    paired = evaluate_pas(meta.rows, images, texts, "paired_caption")
    scalar = evaluate_pas(meta.rows, images, texts, mode) if mode != "paired_caption" else None
    written = write_pas_files(out_dir, paired, scalar)
    figures = overall(scalar if scalar is not None else paired)
    figures.update(exact_figures(meta.rows, images, texts, mode))
    results = {f"pas/{k}": v for k, v in figures.items()}
    results.update(model_type=model.model_type, backend=backend_name(e), checkpoint=e.checkpoint, pairs_file=path,
                   pas_ground_truth_mode=mode)  # fmt: skip
    write_json(os.path.join(out_dir, "results.json"), results)
    shown = [
        r for r in (scalar or paired) if r["Dataset"].startswith("WAVG_") or len({x["Dataset"] for x in paired}) == 1
    ]
    print(f"\nPAS text->image ({mode}) on {len(keys)} images / {len(captions)} captions ({model.model_type})")
    print(format_table(["query type", "queries", "mAP", "Rank-1", "Rank-5"],
                       [[r["QueryType"], r["num_queries"], f"{r['mAP']:.4f}", f"{r['Rank-1']:.4f}",
                         f"{r['Rank-5']:.4f}"] for r in shown if not r["Dataset"].startswith("AVG_")]))  # fmt: skip
    _print_exact_pas(results)
    print("files: " + ", ".join(os.path.basename(p) for p in written))
    return results


def _metadata_validation(cfg: ExperimentConfig, out_dir: str) -> dict:
    """TAO 7.3's ``trainer.test`` route: ``dataset.val`` with ``metadata_match_eval`` and no ``evaluate.datasets``
    gives the validation's PAS figures (``dataset.val.metadata_match_mode``), logged as ``test/pas/...``."""
    from clip_tao.data.loaders import build_val_loader
    from clip_tao.engine.pas_validation import PasValidation

    model, device = build_encoder(cfg, "evaluate")
    val = build_val_loader(cfg.dataset, model.preprocess, model.tokenizer, cfg.dataset.pin_memory)
    if val is None or val.kind != "custom":
        raise DataError("dataset.val.metadata_match_eval=true in evaluate needs dataset.val.datasets (custom folders)")
    embedded = embed_loader(model, val.loader, device, resolve_precision("fp32", device), desc="validate")
    figures = PasValidation(cfg.dataset.val).figures(val.samples, embedded)
    results = {**figures, "model_type": model.model_type, "backend": backend_name(cfg.evaluate),
               "checkpoint": cfg.evaluate.checkpoint, "metadata_match_mode": cfg.dataset.val.metadata_match_mode}  # fmt: skip
    write_json(os.path.join(out_dir, "results.json"), results)
    print(f"\nPAS text->image ({cfg.dataset.val.metadata_match_mode}) on dataset.val ({model.model_type})")
    print(format_table(["query type", "mAP", "Rank-1", "Rank-5"],
                       [[kind, f"{figures[f'pas/{kind}_mAP']:.4f}", f"{figures[f'pas/{kind}_rank1']:.4f}",
                         f"{figures[f'pas/{kind}_rank5']:.4f}"]
                        for kind in ("easy", "medium", "hard", "overall") if f"pas/{kind}_mAP" in figures]))  # fmt: skip
    _print_exact_pas(figures)
    return results


def _print_exact_pas(figures: dict) -> None:
    """clip-tao's exact figures for the PAS queries (ties against the model), one row a query type."""
    kinds = [k.removeprefix("pas/").removesuffix("_t2i_R@1") for k in figures if k.endswith("_t2i_R@1")]
    if not kinds:
        return
    names = ("R@1", "R@5", "R@10", "mAP", "MedR", "AUC")
    print("clip-tao's exact text->image figures for the same queries (ties count against the model):")
    print(format_table(["query type", *names],
                       [[kind, *(f"{figures[f'pas/{kind}_t2i_{n}']:.4g}" for n in names)] for kind in kinds]))  # fmt: skip


def _retrieval_collection(cfg: ExperimentConfig) -> Collection:
    """``evaluate.datasets`` or ``evaluate.wds``, else (as TAO 7.0.1) the validation data, folders or shards."""
    e = cfg.evaluate
    if e.datasets or wds_given(e.wds):
        return build_collection(e.datasets, e.wds, "evaluate", e.batch_size)
    val = cfg.dataset.val
    if val.type == "wds":
        return build_collection([], val.wds, "dataset.val", e.batch_size)
    if not val.datasets:
        raise DataError(
            "nothing to evaluate: set evaluate.datasets (image/caption folders), evaluate.wds (shards) "
            "or dataset.val.datasets"
        )
    return build_collection(val.datasets, None, "dataset.val", e.batch_size)


def _classification(cfg: ExperimentConfig, out_dir: str, ctx: DistContext) -> dict | None:
    e = cfg.evaluate
    entries, section = (
        (e.datasets, "evaluate.datasets") if e.datasets else (cfg.dataset.val.datasets, "dataset.val.datasets")
    )
    samples, labels, folders = scan_labelled_images(entries, section)
    classnames = (
        _read_lines(e.classnames_file, "evaluate.classnames_file")
        if e.classnames_file
        else [f.replace("_", " ") for f in folders]
    )
    if len(classnames) != len(folders):
        raise DataError(
            f"evaluate.classnames_file has {len(classnames)} names for {len(folders)} classes ({', '.join(folders[:5])} ...)"
        )
    templates = (
        _read_lines(e.templates_file, "evaluate.templates_file") if e.templates_file else list(DEFAULT_TEMPLATES)
    )
    if bad := [t for t in templates if "{}" not in t]:
        raise DataError(f"evaluate.templates_file: template {bad[0]!r} has no {{}} where the class name goes")

    model, device = build_encoder(cfg, "evaluate", ctx.device)
    precision = resolve_precision("fp32", device)
    collection = samples_collection(samples, SkipCounter(), section, e.batch_size)
    embeddings = _embed_share(cfg, model, device, precision, collection, ctx, texts=False, desc="classify")
    if embeddings is None:
        return None
    if len(embeddings.image) == 0:
        raise DataError(f"{section}: no decodable image")
    classes = class_embeddings(
        lambda texts: embed_texts(model, texts, device, precision, e.batch_size), classnames, templates
    )
    kept = torch.tensor(labels)[embeddings.indices]
    metrics = classification_metrics(embeddings.image @ classes.T, kept, len(classnames))
    confusion, per_class = metrics.pop("confusion"), metrics.pop("per_class")

    plots.confusion_matrix_png(confusion, classnames, os.path.join(out_dir, "confusion_matrix.png"))
    _write_per_class_csv(os.path.join(out_dir, "per_class.csv"), folders, classnames, per_class)
    results = {
        **metrics,
        "num_templates": len(templates),
        "model_type": model.model_type,
        "backend": backend_name(e),
        "checkpoint": e.checkpoint,
        "skipped_files": dict(embeddings.skipped),
        "num_processes": ctx.world_size,
    }
    write_json(os.path.join(out_dir, "results.json"), results)
    print(
        f"\nZero-shot classification of {metrics['num_images']} images into {len(classnames)} classes ({model.model_type})"
    )
    print(
        format_table(
            ["top-1 %", "top-5 %", "mean per-class recall %"],
            [[metrics["top1"], metrics["top5"], metrics["mean_per_class_recall"]]],
        )
    )
    if len(classnames) <= 20:
        rows = [[name, row["support"], row["recall"], row["precision"]] for name, row in zip(classnames, per_class)]
        print(format_table(["class", "images", "recall %", "precision %"], rows))
    return results


def _pairs(cfg: ExperimentConfig, out_dir: str) -> dict:
    e = cfg.evaluate
    lines = read_pairs_file(e.pairs_file)
    model, device = build_encoder(cfg, "evaluate")
    if hasattr(model, "require"):  # a deployed backend must hold both encoders
        model.require("vision")
        model.require("text")
    precision = resolve_precision("fp32", device)
    samples = [Sample(line.image, None, f"line {line.line}") for line in lines]
    loader = build_image_loader(
        samples, model.preprocess, e.batch_size, e.num_workers, "evaluate.num_workers", cfg.dataset.pin_memory
    )
    embeddings = embed_loader(model, loader, device, precision, desc="embed pair images", texts=False)
    if embeddings.image is None:
        raise DataError(f"evaluate.pairs_file {e.pairs_file!r}: no image could be decoded")
    kept = [lines[k] for k in embeddings.indices.tolist()]
    # Each distinct caption once: a foil equal to its true caption then ties exactly.
    texts = sorted({t for line in kept for t in (line.positive, *line.negatives)})
    vectors = embed_texts(model, texts, device, precision, e.batch_size)
    figures, wins = pairs_accuracy(kept, embeddings.image, dict(zip(texts, vectors)))
    results = {
        **figures,
        "model_type": model.model_type,
        "backend": backend_name(e),
        "checkpoint": e.checkpoint,
        "pairs_file": e.pairs_file,
        "skipped_files": dict(embeddings.skipped),
    }
    write_json(os.path.join(out_dir, "results.json"), results)
    _write_pair_wins(os.path.join(out_dir, "pairs_results.csv"), kept, wins)
    print(f"\nCompositional pairs: {len(kept)} images, {len(texts)} distinct captions ({model.model_type})")
    rows = [["all", figures["num_pairs"], figures["pairs_accuracy"]]]
    rows += [[k.split("/", 1)[1], figures[f"num_pairs/{k.split('/', 1)[1]}"], v]
             for k, v in figures.items() if k.startswith("pairs_accuracy/")]  # fmt: skip
    print(format_table(["tag", "pairs", "accuracy %"], rows))
    print("a line counts when its true caption scores strictly above every foil (a tie is not a win)")
    if embeddings.skipped:
        print(f"skipped: {embeddings.skipped.summary()}")
    return results


def _write_pair_wins(path: str, lines, wins: list[bool]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["line", "image", "tag", "positive", "win"])
        for line, win in zip(lines, wins):
            writer.writerow([line.line, line.image, line.tag or "", line.positive, int(win)])


def _read_lines(path: str, key: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"{key} {path!r} does not exist")
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise DataError(f"{key} {path!r} is empty")
    return lines


def _write_per_class_csv(path: str, folders: list[str], classnames: list[str], per_class: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class_index", "folder", "class_name", "images", "recall_percent", "precision_percent"])
        for i, (folder, name, row) in enumerate(zip(folders, classnames, per_class)):
            writer.writerow([i, folder, name, row["support"], f"{row['recall']:.4f}", f"{row['precision']:.4f}"])

"""``clip-tao evaluate``: image-text retrieval in both directions, or zero-shot classification.

Retrieval (TAO's): ``evaluate.datasets`` (falling back to ``dataset.val``), one or many captions per image.
Classification (``evaluate.mode: classification``): a folder per class, prompts from templates.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import torch

from clip_tao.classification import DEFAULT_TEMPLATES, class_embeddings, classification_metrics
from clip_tao.config.checks import check_implemented
from clip_tao.config.schema import ExperimentConfig
from clip_tao.data.classes import build_image_loader, scan_labelled_images
from clip_tao.data.loaders import build_eval_loader, build_val_loader
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.embedding import embed_loader, embed_texts
from clip_tao.engine.model_setup import backend_name, build_encoder
from clip_tao.errors import DataError
from clip_tao.io import plots
from clip_tao.io.atomic import atomic_path, write_json
from clip_tao.io.tables import format_retrieval_table, format_table
from clip_tao.io.tao_kpi import tao_retrieval_kpi
from clip_tao.io.task_dir import failure_message, prepare_task_dir
from clip_tao.metrics import compute_retrieval

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict:
    check_implemented(cfg, "evaluate")
    out_dir, status = prepare_task_dir(cfg, "evaluate")
    status.write("STARTED", f"Starting evaluation ({cfg.evaluate.mode}).")
    try:
        pas_file = _pas_pairs_file(cfg)
        if cfg.evaluate.mode == "classification":
            results = _classification(cfg, out_dir)
        elif pas_file is not None:
            results = _pas(cfg, out_dir, *pas_file)
        else:
            results = _retrieval(cfg, out_dir)
    except (Exception, KeyboardInterrupt) as exc:
        status.write("FAILURE", failure_message("Evaluation", exc))
        raise
    kpi = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    kpi.update(tao_retrieval_kpi(kpi, "test"))  # TAO's test/... keys, fractions as strings
    status.write("SUCCESS", "Evaluation finished.", kpi=kpi)
    print(f"results: {os.path.join(out_dir, 'results.json')} (plots and status.json beside it)")
    return results


def _retrieval(cfg: ExperimentConfig, out_dir: str) -> dict:
    e = cfg.evaluate
    model, device = build_encoder(cfg, "evaluate")
    if hasattr(model, "require"):  # a deployed backend must hold both encoders
        model.require("vision")
        model.require("text")
    data, section = _retrieval_data(cfg, model)
    precision = resolve_precision("fp32", device)
    embeddings = embed_loader(model, data.loader, device, precision, desc="evaluate")
    if embeddings.image is None or len(embeddings.image) < 2:
        raise DataError(f"{section}: fewer than two decodable images; nothing to rank")
    texts, owner = _all_captions(model, data, embeddings, device, precision, e.batch_size)
    result = compute_retrieval(embeddings.image, texts, owner, device=device)
    metrics = result.figures
    skipped = embeddings.skipped + data.scan_skipped
    results = {
        **metrics,
        "model_type": model.model_type,
        "backend": backend_name(e),
        "checkpoint": e.checkpoint,
        "skipped_files": dict(skipped),
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
    if cfg.evaluate.pas_ground_truth_mode != "paired_caption":
        raise DataError(
            f"evaluate.pas_ground_truth_mode={cfg.evaluate.pas_ground_truth_mode} needs an evaluate.datasets entry "
            "with a pairs file (attribute_pairs_file, or <stem>_pairs.json beside its <stem>_list.txt)"
        )
    return None


def _pas(cfg: ExperimentConfig, out_dir: str, entry, path: str) -> dict:
    """TAO's PAS text->image evaluation of one pairs file: its CSV files, and the figures as KPIs."""
    from clip_tao.data.custom import Sample
    from clip_tao.data.pas_metadata import load_metadata
    from clip_tao.pas import dataset_of, evaluate_pas, overall, write_pas_files

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
    print("files: " + ", ".join(os.path.basename(p) for p in written))
    return results


def _retrieval_data(cfg: ExperimentConfig, model):
    e = cfg.evaluate
    pin = cfg.dataset.pin_memory
    if e.datasets:
        loader = build_eval_loader(e.datasets, "evaluate.datasets", model.preprocess, model.tokenizer,
                                   e.batch_size, e.num_workers, pin)  # fmt: skip
        return loader, "evaluate.datasets"
    # TAO 7.0.1 falls back to the validation data when evaluate.datasets is not given.
    loader = build_val_loader(cfg.dataset, model.preprocess, model.tokenizer, pin)
    if loader is None:
        raise DataError("nothing to evaluate: set evaluate.datasets (or dataset.val.datasets) to image/caption folders")
    return loader, "dataset.val"


def _all_captions(model, data, embeddings, device, precision, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption of every embedded image and the image it belongs to.

    The loader gives each image's first caption; multi-caption entries add the rest here.
    """
    count = len(embeddings.image)
    owner = [torch.arange(count)]
    texts = [embeddings.text]
    if data.samples:
        extra, extra_owner = [], []
        for row, index in enumerate(embeddings.indices.tolist()):
            for caption in data.samples[index].extra_captions:
                extra.append(caption)
                extra_owner.append(row)
        if extra:
            texts.append(embed_texts(model, extra, device, precision, batch_size))
            owner.append(torch.tensor(extra_owner))
    return torch.cat(texts), torch.cat(owner)


def _classification(cfg: ExperimentConfig, out_dir: str) -> dict:
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

    model, device = build_encoder(cfg, "evaluate")
    precision = resolve_precision("fp32", device)
    classes = class_embeddings(
        lambda texts: embed_texts(model, texts, device, precision, e.batch_size), classnames, templates
    )
    loader = build_image_loader(
        samples, model.preprocess, e.batch_size, e.num_workers, "evaluate.num_workers", cfg.dataset.pin_memory
    )
    embeddings = embed_loader(model, loader, device, precision, desc="classify", texts=False)
    if embeddings.image is None:
        raise DataError(f"{section}: no decodable image")
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

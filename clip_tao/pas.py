"""TAO 7.3's PAS evaluation: text-to-image retrieval with positives defined by attribute metadata.

Per dataset, the gallery is its distinct ``(dataset, image_path)`` images in order of first appearance. Queries
and their relevant images (``ground_truth_mode``):

- ``scalar_attributes``: one query per distinct ``(query_type, caption)`` of type easy/medium/hard; an image is
  relevant when it equals every attribute the query specifies (``text_attr >= 0``); a caption with several
  metadata signatures gets the union of their images;
- ``scalar_plus_accessories``: also every accessory the query requires is among the image's;
- ``paired_caption``: every query type; relevant are the images of the rows with exactly that caption and type.

Queries without a relevant image are dropped. Images are ranked by the dot product of L2-normalised float32
embeddings, ties to the lower gallery index. With ``r_1 < ... < r_m`` the ranks of the ``m`` relevant images of a
gallery of ``G``: AP = mean_k k / r_k; Rank-1 = [r_1 <= 1]; Rank-5 = [r_1 <= 5]; First Pos = r_1;
Match@5 = #{r_k <= 5} / min(5, m); Zero@5 = [no r_k <= 5]; Separability = (Σ_k (G − r_k + 1) − m(m+1)/2) /
(m (G − m)), 1 when G = m. Rows per (dataset, query type) hold the means (First Pos: the median); ``AVG_<n>_DATASETS``
is the plain mean over the datasets of every column, ``WAVG_<n>_DATASETS`` the num_queries-weighted mean (First Pos
empty); the ``overall`` figures weight the easy/medium/hard rows of WAVG by their num_queries.

:func:`exact_figures` gives clip-tao's own retrieval figures for the same queries and relevant images, with the tie
and NaN rules of :mod:`clip_tao.metrics` (ties count against the model, not by gallery index).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Sequence

import torch

from clip_tao.io.atomic import atomic_path
from clip_tao.metrics import FIGURES, summarise
from clip_tao.positive_sets import rank_positive_sets

PAS_K = 5
METADATA_TYPES = ("easy", "medium", "hard")
COLUMNS = ["Dataset", "QueryType", "EasyAttribute", "num_queries", "gallery_size", "avg_gt_per_query", "mAP",
           "Rank-1", "Rank-5", "Separability", "Match@5", "Zero@5", "First Pos"]  # fmt: skip
_MEANS = ["avg_gt_per_query", "mAP", "Rank-1", "Rank-5", "Separability", "Match@5", "Zero@5"]


def dataset_of(row: dict) -> str:
    """TAO's dataset name of a pairs row: ``dataset``, else the path segment after ``images``/``data``."""
    if row.get("dataset"):
        return str(row["dataset"])
    parts = [p for p in str(row["image_path"]).replace("\\", "/").split("/") if p]
    for marker in ("images", "data"):
        if marker in parts[:-1]:
            return parts[parts.index(marker) + 1]
    if len(parts) >= 2:
        return parts[0]
    raise ValueError(f"image_path {row['image_path']!r} names no dataset: add a dataset field")


def queries(rows: Sequence[dict], mode: str) -> tuple[dict[str, list], list[dict]]:
    """``(gallery per dataset: [image_path ...], queries: {dataset, type, caption, relevant: set of indices})``."""
    galleries: dict[str, list] = {}
    where: dict[tuple, int] = {}
    for row in rows:
        name = dataset_of(row)
        key = (name, row["image_path"])
        if key not in where:
            where[key] = len(galleries.setdefault(name, []))
            galleries[name].append(row)
    found: dict[tuple, set] = {}
    for row in rows:
        name, kind = dataset_of(row), row.get("query_type", "easy")
        if mode != "paired_caption" and kind not in METADATA_TYPES:
            continue
        key = (name, kind, row["caption"])
        relevant = found.setdefault(key, set())
        if mode == "paired_caption":
            relevant.add(where[(name, row["image_path"])])
            continue
        for index, image in enumerate(galleries[name]):
            if metadata_matches(row, image, mode == "scalar_plus_accessories"):
                relevant.add(index)
    out = [{"dataset": d, "type": t, "caption": c, "relevant": r} for (d, t, c), r in found.items() if r]
    return {name: [r["image_path"] for r in g] for name, g in galleries.items()}, out


def metadata_matches(query: dict, image: dict, accessories: bool) -> bool:
    """TAO's rule: the image has every attribute the query's text constrains (``text_attr_values >= 0``), and with
    ``accessories`` every accessory the text requires. Rows as :func:`~clip_tao.data.pas_metadata.load_metadata`
    gives them ("not visible" already -1)."""
    wanted, own = query["text_attr_values"], image["image_attr_values"]
    if any(w >= 0 and w != o for w, o in zip(wanted, own)):
        return False
    if accessories:
        return set(query.get("text_accessory_ids") or []) <= set(image.get("image_accessory_ids") or [])
    return True


def query_metrics(similarity: torch.Tensor, relevant: set[int]) -> dict[str, float]:
    """One query's figures from its similarities to the gallery (``[G]``)."""
    g = similarity.shape[0]
    order = torch.sort(-similarity, stable=True).indices  # stable: ties keep the lower gallery index first
    rank_of = torch.empty(g, dtype=torch.long)
    rank_of[order] = torch.arange(1, g + 1)
    ranks = sorted(rank_of[sorted(relevant)].tolist())
    m = len(ranks)
    hits = sum(r <= PAS_K for r in ranks)
    separability = 1.0 if g == m else (sum(g - r + 1 for r in ranks) - m * (m + 1) / 2) / (m * (g - m))
    return {
        "AP": sum((k + 1) / r for k, r in enumerate(ranks)) / m,
        "Rank-1": float(ranks[0] <= 1),
        "Rank-5": float(ranks[0] <= PAS_K),
        "First Pos": float(ranks[0]),
        "Match@5": hits / min(PAS_K, m),
        "Zero@5": float(hits == 0),
        "Separability": separability,
        "gt": float(m),
    }


def evaluate_pas(rows, image_emb: dict, text_emb: dict, mode: str) -> list[dict]:
    """Per-dataset-and-type rows, then AVG and WAVG (TAO's CSV rows). ``image_emb[(dataset, image_path)]`` and
    ``text_emb[caption]`` are L2-normalised vectors."""
    galleries, qs = queries(rows, mode)
    per: dict[tuple, list] = {}
    for q in qs:
        gallery = torch.stack([image_emb[(q["dataset"], path)] for path in galleries[q["dataset"]]]).float()
        sims = gallery @ text_emb[q["caption"]].float()
        per.setdefault((q["dataset"], q["type"]), []).append(query_metrics(sims, q["relevant"]))
    names = sorted(galleries, key=lambda n: (n != "RSTPReid", n))
    out = []
    for name in names:
        for kind in sorted({t for d, t in per if d == name}, key=_type_order):
            figures = per[(name, kind)]
            row = {"Dataset": name, "QueryType": kind, "EasyAttribute": "", "num_queries": len(figures),
                   "gallery_size": len(galleries[name])}  # fmt: skip
            row["avg_gt_per_query"] = statistics.fmean(f["gt"] for f in figures)
            row["mAP"] = statistics.fmean(f["AP"] for f in figures)
            for key in ("Rank-1", "Rank-5", "Separability", "Match@5", "Zero@5"):
                row[key] = statistics.fmean(f[key] for f in figures)
            row["First Pos"] = statistics.median(f["First Pos"] for f in figures)
            out.append(row)
    n = len(names)
    for kind in sorted({r["QueryType"] for r in out}, key=_type_order):
        rows_of = [r for r in out if r["QueryType"] == kind]
        avg = {"Dataset": f"AVG_{n}_DATASETS", "QueryType": kind, "EasyAttribute": ""}
        for key in ("num_queries", "gallery_size", *_MEANS, "First Pos"):
            avg[key] = statistics.fmean(r[key] for r in rows_of)
        total = sum(r["num_queries"] for r in rows_of)
        wavg = {"Dataset": f"WAVG_{n}_DATASETS", "QueryType": kind, "EasyAttribute": "", "num_queries": total,
                "gallery_size": statistics.fmean(r["gallery_size"] for r in rows_of), "First Pos": math.nan}  # fmt: skip
        for key in _MEANS:
            wavg[key] = sum(r[key] * r["num_queries"] for r in rows_of) / total
        out += [avg, wavg]
    return out


def exact_figures(rows, image_emb: dict, text_emb: dict, mode: str) -> dict[str, float]:
    """clip-tao's text->image figures (``R@K``, ``mAP``, ``MedR``, ``MeanR``, percent; ``AUC``) of the PAS queries
    of ``mode``, each ranked against its dataset's gallery: ``{"<type>_t2i_R@1": ...}`` for every query type, and
    ``overall_t2i_*`` over the easy/medium/hard queries (the ones TAO's overall figures count). Exact at any size
    (:func:`clip_tao.positive_sets.rank_positive_sets`)."""
    galleries, qs = queries(rows, mode)
    per_type: dict[str, list] = {}
    for name, paths in galleries.items():
        mine = [q for q in qs if q["dataset"] == name]
        if not mine:
            continue
        gallery = torch.stack([image_emb[(name, path)] for path in paths]).float()
        texts = torch.stack([text_emb[q["caption"]] for q in mine]).float()
        result = rank_positive_sets(texts, gallery, [q["relevant"] for q in mine])
        for k, q in enumerate(mine):
            per_type.setdefault(q["type"], []).append((result.ranks[k], result.aps[k], result.aucs[k]))
    groups = {kind: per_type[kind] for kind in sorted(per_type, key=_type_order)}
    pooled = [v for kind in METADATA_TYPES for v in per_type.get(kind, [])]
    if pooled:
        groups["overall"] = pooled
    out = {}
    for kind, values in groups.items():
        ranks, aps, aucs = (torch.tensor([v[i] for v in values], dtype=torch.float64) for i in range(3))
        figures = summarise(ranks, aps, aucs)
        out.update({f"{kind}_t2i_{name}": figures[name] for name in FIGURES})
    return out


def overall(rows: list[dict]) -> dict[str, float]:
    """TAO's ``val/pas/*`` figures: the WAVG easy/medium/hard rows and their num_queries-weighted overall."""
    wavg = [r for r in rows if r["Dataset"].startswith("WAVG_") and r["QueryType"] in METADATA_TYPES]
    out = {}
    for r in wavg:
        out.update({f"{r['QueryType']}_mAP": r["mAP"], f"{r['QueryType']}_rank1": r["Rank-1"],
                    f"{r['QueryType']}_rank5": r["Rank-5"]})  # fmt: skip
    total = sum(r["num_queries"] for r in wavg)
    if total:
        for ours, theirs in (("mAP", "mAP"), ("rank1", "Rank-1"), ("rank5", "Rank-5")):
            out[f"overall_{ours}"] = sum(r[theirs] * r["num_queries"] for r in wavg) / total
    return out


def is_tao_kpi(name: str) -> bool:
    """Whether ``name`` (``pas/...`` or bare) is one of TAO's PAS KPIs, which TAO logs as fractions in strings."""
    kind, _, figure = name.removeprefix("pas/").partition("_")
    return kind in (*METADATA_TYPES, "overall") and figure in ("mAP", "rank1", "rank5")


def write_csv(path: str, rows: list[dict]) -> None:
    """TAO's columns; floats as ``%.16g``, NaN as an empty cell; written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(row.get(c, "")) for c in COLUMNS])


def write_pas_files(folder: str, paired: list[dict], metadata: list[dict] | None) -> list[str]:
    """TAO's file names: ``nvidia_pas_metrics*.csv`` (paired_caption) and, in a scalar mode,
    ``nvidia_pas_metadata_metrics*.csv``; each as per-dataset, ``_aggregate`` (AVG) and ``_weighted_aggregate``."""
    written = []
    for stem, rows in (("nvidia_pas_metrics", paired), ("nvidia_pas_metadata_metrics", metadata)):
        if rows is None:
            continue
        parts = {
            "": [r for r in rows if not r["Dataset"].startswith(("AVG_", "WAVG_"))],
            "_aggregate": [r for r in rows if r["Dataset"].startswith("AVG_")],
            "_weighted_aggregate": [r for r in rows if r["Dataset"].startswith("WAVG_")],
        }
        for suffix, part in parts.items():
            path = os.path.join(folder, f"{stem}{suffix}.csv")
            write_csv(path, part)
            written.append(path)
    return written


def _type_order(kind: str) -> tuple:
    known = ("easy", "medium", "hard", "natural_caption", "original_captions")
    return (known.index(kind), "") if kind in known else (len(known), kind)


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, ".16g")
    return value

"""Groups of near-duplicate images: range search through an index, confirmed by exact cosine, no N x N matrix.

Rows are visited in order. A row not yet in a group asks the index for every row above the threshold (less
a margin for compressed indexes, whose scores are approximate), keeps those whose exact cosine with it —
read from the embeddings file — reaches the threshold and that are in no group yet, and becomes the first
of a group with them. Every member is thus at least ``threshold``-similar to its group's first image.
Memory: one flag a row plus one chunk of vectors and its range-search results.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from clip_tao.index.searcher import IndexSearcher
from clip_tao.index.source import EmbeddingSource
from clip_tao.io.atomic import write_text
from clip_tao.io.contact_sheet import write_contact_sheet

# How far below the threshold a compressed index's approximate score may fall for a true duplicate.
SCORE_MARGIN = {"flat": 1e-4, "hnsw": 1e-4, "ivf-flat": 1e-4, "ivf-sq8": 0.02, "ivf-pq": 0.1}
SHEET_GROUPS = 500  # the HTML page shows at most this many groups (duplicates.csv has them all)


@dataclass
class DuplicateGroup:
    """Row numbers, the first one first, and each member's exact cosine with the first."""

    rows: list[int]
    similarity: list[float]


def find_duplicate_groups(
    searcher: IndexSearcher, source: EmbeddingSource, threshold: float, margin: float = 1e-4, chunk_rows: int = 4096
) -> list[DuplicateGroup]:
    grouped = np.zeros(source.count, dtype=bool)
    groups = []
    chunks = tqdm(source.chunks(chunk_rows), total=-(-source.count // chunk_rows), desc="dedup", leave=False)
    for start, block in chunks:
        lims, _, found = searcher.range_search(block, threshold - margin)
        for r in range(len(block)):
            row = start + r
            candidates = found[lims[r] : lims[r + 1]]
            if grouped[row] or len(candidates) < 2:  # the row itself is always among them
                continue
            candidates = np.unique(candidates[(candidates != row) & ~grouped[candidates]])
            if not len(candidates):
                continue
            exact = source.rows(candidates) @ block[r]
            keep = exact >= threshold
            if not keep.any():
                continue
            members, scores = candidates[keep], exact[keep]
            order = np.argsort(-scores, kind="stable")
            grouped[row] = True
            grouped[members] = True
            groups.append(DuplicateGroup([row, *members[order].tolist()], [1.0, *np.round(scores[order], 6).tolist()]))
    return groups


def write_duplicates(out_dir: str, groups: list[DuplicateGroup], paths: list[str], title: str) -> tuple[str, str]:
    """``duplicates.csv`` (group, path, similarity to the group's first) and ``duplicates.html``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["group", "path", "similarity"])
    for g, group in enumerate(groups):
        for row, score in zip(group.rows, group.similarity):
            writer.writerow([g, paths[row], f"{score:.6f}"])
    table = os.path.join(out_dir, "duplicates.csv")
    write_text(table, buffer.getvalue())
    sheet = os.path.join(out_dir, "duplicates.html")
    shown = [
        {
            "label": f"group {g} ({len(group.rows)} images)",
            "kind": "image",
            "query": paths[group.rows[0]],
            "results": [
                {"rank": rank, "image_path": paths[row], "score": score}
                for rank, (row, score) in enumerate(zip(group.rows, group.similarity), start=1)
            ],
        }
        for g, group in enumerate(groups[:SHEET_GROUPS])
    ]
    more = f"; the first {SHEET_GROUPS} shown, all in duplicates.csv" if len(groups) > SHEET_GROUPS else ""
    write_contact_sheet(sheet, f"{title}: {len(groups)} groups{more}", shown)
    return table, sheet

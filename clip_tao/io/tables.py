"""Readable tables for the end of a task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from clip_tao.metrics import FIGURES


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(str(h)), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line, "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |", line]
    aligned = [
        [c.rjust(w) if isinstance(v, (int, float)) else c.ljust(w) for c, v, w in zip(cells_row, row, widths)]
        for cells_row, row in zip(cells, rows)
    ]
    out += ["| " + " | ".join(row) + " |" for row in aligned]
    out.append(line)
    return "\n".join(out)


def format_retrieval_table(metrics: Mapping[str, Any]) -> str:
    """Both directions, one row each: R@1, R@5, R@10, mAP, MedR, MeanR, AUC."""
    rows = []
    for prefix, label in (("i2t", "image -> text (i2t)"), ("t2i", "text -> image (t2i)")):
        if f"{prefix}_R@1" in metrics:
            rows.append([label, *(metrics[f"{prefix}_{name}"] for name in FIGURES)])
    return format_table(["direction", *FIGURES], rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 and value != 0 else f"{value:.2f}"
    return str(value)

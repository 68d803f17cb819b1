"""Compositional evaluation (``evaluate.mode: pairs``): does the true caption outscore every foil?

A pairs file holds one JSON object a line, as SugarCrepe / ARO / Winoground data comes::

    {"image": "images/1.jpg", "positive": "a red circle above a blue square",
     "negatives": ["a blue circle above a red square"], "tag": "swap-att"}

``image`` is relative to the file's folder or absolute; ``tag`` is optional. A line counts as a win when the
image's similarity to ``positive`` is strictly greater than to every negative: a tie is not a win (a model
that cannot tell the captions apart gets no credit). Identical texts are embedded once, so a foil equal to
the true caption ties exactly. Accuracies are percentages of the lines whose image could be decoded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from clip_tao.errors import DataError

KEY = "evaluate.pairs_file"


@dataclass(frozen=True)
class PairLine:
    image: str  # resolved path
    positive: str
    negatives: tuple[str, ...]
    tag: str | None
    line: int  # 1-based line number in the file


def read_pairs_file(path: str | None) -> list[PairLine]:
    """Every non-blank line of ``path``; a bad line is one :class:`DataError` naming the file and line."""
    if not path:
        raise DataError(f"evaluate.mode=pairs needs {KEY}: a JSON-lines file of image, positive and negatives")
    if not os.path.isfile(path):
        raise DataError(f"{KEY} {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    lines = []
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    for number, raw in enumerate(raw_lines, start=1):
        where = f"{KEY} {path!r} line {number}"
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where} is not UTF-8 text") from None
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno})") from None
        lines.append(_parse(item, where, base, number))
    if not lines:
        raise DataError(f"{KEY} {path!r} holds no lines")
    return lines


def _parse(item, where: str, base: str, number: int) -> PairLine:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with image, positive and negatives")
    image, positive, negatives, tag = item.get("image"), item.get("positive"), item.get("negatives"), item.get("tag")
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: 'image' must be a path (relative to the file's folder or absolute)")
    if not isinstance(positive, str) or not positive.strip():
        raise DataError(f"{where}: 'positive' must be a non-empty caption")
    if isinstance(negatives, str):
        negatives = [negatives]
    if not isinstance(negatives, list) or not negatives or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise DataError(f"{where}: 'negatives' must be a list of one or more non-empty captions")
    if tag is not None and not isinstance(tag, str):
        raise DataError(f"{where}: 'tag' must be a string when given")
    path = image if os.path.isabs(image) else os.path.join(base, image)
    return PairLine(path, positive.strip(), tuple(n.strip() for n in negatives), tag or None, number)


def pairs_accuracy(
    lines: list[PairLine], image_emb: torch.Tensor, text_emb: dict[str, torch.Tensor]
) -> tuple[dict[str, float], list[bool]]:
    """``(figures, wins)``: ``pairs_accuracy`` (percent), ``pairs_accuracy/<tag>``, ``num_pairs[/<tag>]``.

    ``image_emb[i]`` belongs to ``lines[i]``; ``text_emb`` maps each caption to its embedding.
    """
    wins = []
    for line, image in zip(lines, image_emb):
        positive = float(image @ text_emb[line.positive])
        best_foil = max(float(image @ text_emb[n]) for n in line.negatives)
        wins.append(positive > best_foil)  # a tie is no win
    figures: dict[str, float] = {"pairs_accuracy": 100.0 * sum(wins) / max(len(wins), 1), "num_pairs": len(wins)}
    for tag in sorted({line.tag for line in lines if line.tag}):
        tagged = [w for line, w in zip(lines, wins) if line.tag == tag]
        figures[f"pairs_accuracy/{tag}"] = 100.0 * sum(tagged) / len(tagged)
        figures[f"num_pairs/{tag}"] = len(tagged)
    return figures, wins

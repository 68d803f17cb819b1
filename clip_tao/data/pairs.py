"""Hard-negative captions and duplicate-pair ids for training batches.

A negative file holds one negative caption of its image a non-empty line (custom data: the file at the
caption's relative path under ``negative_caption_dir``; shards: the ``neg.txt`` member). Training draws
``train.hard_negatives_per_sample`` of them a sample from the sample's own seed, so a resumed run draws
the same ones. Batches then carry ``negative_ids`` (the tokens of the drawn negatives, sample by sample)
and ``pair_info`` (a :class:`~clip_tao.pair_losses.PairInfo`: the ids the loss needs to tell negatives,
duplicates and empty slots apart).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from clip_tao.pair_losses import PAD, PairInfo, text_id


@dataclass(frozen=True)
class PairOptions:
    """What training batches carry beyond (image, caption)."""

    negatives_per_sample: int = 0  # K hard-negative slots a sample
    hash_images: bool = False  # content ids of images (byte-identical files are duplicates)

    @property
    def enabled(self) -> bool:
        return self.negatives_per_sample > 0 or self.hash_images


NO_PAIRS = PairOptions()  # plain (image, caption) batches


def parse_negatives(raw: bytes) -> tuple[tuple[str, ...], str | None]:
    """``(negatives, None)`` or ``((), reason)`` for a file that is not UTF-8 or holds no caption."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return (), "negatives_not_utf8"
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        return (), "empty_negatives"
    return lines, None


def read_negatives(path: str) -> tuple[tuple[str, ...], str | None]:
    """The negatives of one file; a missing file means "no negatives" and is not a problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return (), None
    except OSError:
        return (), "unreadable_negatives"
    return parse_negatives(raw)


def draw_negatives(pool: Sequence[str], k: int, seed: int | None) -> list[str]:
    """``k`` of ``pool`` (all of them when there are fewer), chosen by ``seed``; the first ``k`` without one."""
    if len(pool) <= k:
        return list(pool)
    if seed is None:
        return list(pool[:k])
    return random.Random(seed ^ 0x5EED).sample(list(pool), k)


def pair_fields(items: Sequence[dict], tokenizer: Callable, k: int) -> dict:
    """``negative_ids`` (``[M, L]``, the filled slots in sample order) and ``pair_info`` of a batch's items.

    Each item holds ``caption``, ``captions`` (every caption of its image), ``image_id`` and ``negatives``.
    """
    negatives = [n for item in items for n in item["negatives"][:k]]
    slots = torch.full((len(items), k), PAD, dtype=torch.long)
    for row, item in enumerate(items):
        for col, text in enumerate(item["negatives"][:k]):
            slots[row, col] = text_id(text)
    width = max(len(item["captions"]) for item in items)
    sets = torch.full((len(items), width), PAD, dtype=torch.long)
    for row, item in enumerate(items):
        for col, text in enumerate(item["captions"]):
            sets[row, col] = text_id(text)
    info = PairInfo(
        caption_ids=torch.tensor([text_id(item["caption"]) for item in items], dtype=torch.long),
        caption_sets=sets,
        image_ids=torch.tensor([item["image_id"] for item in items], dtype=torch.long),
        negative_ids=slots,
    )
    out: dict = {"pair_info": info}
    if k:
        out["negative_ids"] = tokenizer(negatives) if negatives else None
    return out


def join_pair_fields(batches: Sequence[dict]) -> dict:
    """The pair fields of several batches' :func:`pair_fields` as one batch's, rows in order."""
    if "pair_info" not in batches[0]:
        return {}
    infos = [b["pair_info"] for b in batches]
    width = max(i.caption_sets.shape[1] for i in infos)
    sets = [torch.nn.functional.pad(i.caption_sets, (0, width - i.caption_sets.shape[1]), value=PAD) for i in infos]
    out: dict = {
        "pair_info": PairInfo(
            caption_ids=torch.cat([i.caption_ids for i in infos]),
            caption_sets=torch.cat(sets),
            image_ids=torch.cat([i.image_ids for i in infos]),
            negative_ids=torch.cat([i.negative_ids for i in infos]),
        )
    }
    if "negative_ids" in batches[0]:
        tokens = [b["negative_ids"] for b in batches if b.get("negative_ids") is not None]
        out["negative_ids"] = torch.cat(tokens) if tokens else None
    return out


def slice_pair_fields(batch: dict, start: int, stop: int) -> dict:
    """The pair fields of rows ``start:stop`` of a batch (its drawn negatives' tokens follow the rows)."""
    if "pair_info" not in batch:
        return {}
    info = batch["pair_info"]
    out: dict = {
        "pair_info": PairInfo(
            caption_ids=info.caption_ids[start:stop],
            caption_sets=info.caption_sets[start:stop],
            image_ids=info.image_ids[start:stop],
            negative_ids=info.negative_ids[start:stop],
        )
    }
    if "negative_ids" in batch:
        filled = (info.negative_ids != PAD).sum(1)
        first, last = int(filled[:start].sum()), int(filled[:stop].sum())
        tokens = batch["negative_ids"]
        out["negative_ids"] = None if tokens is None or last == first else tokens[first:last]
    return out

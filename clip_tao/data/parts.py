"""A collection to embed, split into parts: the unit that is embedded, written, resumed and shared out.

Image folders are cut into runs of ``part_size`` consecutive samples; WebDataset shards are one part each.
Each part is read from its start and batched on its own, so the batches (and so the embeddings) do not
depend on how many processes or loader workers share the work, and the parts joined in part order give
the rows of a one-process run in its order. The parts left to do are dealt out round robin: rank ``r`` of
``W`` takes every ``W``-th of them, and inside a rank each loader worker every ``K``-th of the rank's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_tao.config.schema import DatasetEntry, WdsConfig
from clip_tao.data import wds
from clip_tao.data.custom import Sample, SkipCounter, scan_custom_datasets
from clip_tao.data.loaders import ImageTextDataset, collate_skipping_bad, effective_workers
from clip_tao.data.naflex import batch_stacker
from clip_tao.data.transforms import build_eval_transform
from clip_tao.errors import ConfigError, DataError
from clip_tao.models.base import Preprocess
from clip_tao.models.patches import PatchBudgetError
from clip_tao.threads import one_thread_per_worker

log = logging.getLogger(__name__)

MAX_AUTO_PART = 10000  # images a part when part_size is not given: 40 MB of 1,024-d embeddings


@dataclass(frozen=True)
class Part:
    """Part ``index``: samples ``start:stop`` of an image-folder collection, or one shard."""

    index: int
    start: int = 0
    stop: int = 0
    shard: wds.Shard | None = None


@dataclass
class Collection:
    """What to embed: its parts, the scanned samples behind them (image folders; empty for shards)."""

    parts: list[Part]
    samples: list[Sample]
    scan_skipped: SkipCounter
    kind: str  # "custom" or "wds"
    section: str  # the spec key it came from, for messages
    samples_per_shard: int = 0  # the estimate for shards of unknown size

    def estimated_size(self, part: Part) -> int:
        if part.shard is None:
            return part.stop - part.start
        return part.shard.num_samples if part.shard.num_samples is not None else self.samples_per_shard

    def sources(self) -> list[str]:
        """What the parts are made of (image paths, or shard URLs), to tell one collection from another."""
        if self.kind == "wds":
            return [p.shard.url for p in self.parts]
        return [s.image_path for s in self.samples]


def auto_part_size(num_samples: int, batch_size: int) -> int:
    """A 64th of the collection (enough parts for 64 processes), whole batches, at most ~10,000 images."""
    whole = lambda n: max(batch_size, math.ceil(n / batch_size) * batch_size)  # noqa: E731
    return min(whole(math.ceil(num_samples / 64)), whole(MAX_AUTO_PART - batch_size + 1))


def wds_given(cfg: WdsConfig) -> bool:
    return bool(cfg.root_dir or cfg.shard_list_file)


def build_collection(
    entries: Sequence[DatasetEntry],
    wds_cfg: WdsConfig | None,
    section: str,
    batch_size: int,
    part_size: int | None = None,
    require_captions: bool = True,
) -> Collection:
    """The parts of ``<section>.datasets`` (image folders) or ``<section>.wds`` (shards): exactly one is set."""
    if batch_size < 1:
        raise ConfigError(f"{section}.batch_size={batch_size} must be >= 1")
    if part_size is not None and part_size < 1:
        raise ConfigError(f"{section}.part_size={part_size} must be >= 1 (or null for automatic)")
    if wds_cfg is not None and wds_given(wds_cfg):
        if entries:
            raise ConfigError(f"set {section}.datasets (image folders) or {section}.wds (shards), not both")
        shards = wds.list_shards(wds_cfg, f"{section}.wds")
        parts = [Part(i, shard=shard) for i, shard in enumerate(shards)]
        return Collection(parts, [], SkipCounter(), "wds", f"{section}.wds", wds_cfg.samples_per_shard)
    samples, skipped = scan_custom_datasets(entries, f"{section}.datasets", require_captions=require_captions)
    return samples_collection(samples, skipped, f"{section}.datasets", batch_size, part_size)


def samples_collection(
    samples: list[Sample], skipped: SkipCounter, section: str, batch_size: int, part_size: int | None = None
) -> Collection:
    size = part_size or auto_part_size(len(samples), batch_size)
    parts = [Part(i, start, min(start + size, len(samples))) for i, start in enumerate(range(0, len(samples), size))]
    return Collection(parts, samples, skipped, "custom", section)


def rank_parts(parts: Sequence[Part], rank: int, world_size: int) -> list[Part]:
    """This rank's share of ``parts``: every ``world_size``-th, from position ``rank``."""
    return list(parts)[rank::world_size]


class PartStream(IterableDataset):
    """Batches of ``parts``, each part batched from its start; every batch names its ``part`` and whether it
    is the ``last`` of it (a part whose samples were all bad still ends with an empty last batch)."""

    def __init__(
        self,
        collection: Collection,
        parts: Sequence[Part],
        transform: Callable,
        tokenizer: Callable | None,
        batch_size: int,
        stack: Callable = torch.stack,
    ):
        self.collection = collection
        self.parts = list(parts)
        self.transform = transform
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stack = stack
        self.images = ImageTextDataset(collection.samples, transform, tokenizer) if collection.samples else None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for part in self.parts[worker::workers]:
            batches = self._shard_batches(part) if part.shard is not None else self._folder_batches(part)
            yield from batches

    def _batch(self, part: Part, items: list, last: bool, skipped: SkipCounter | None = None) -> dict:
        batch = collate_skipping_bad(items, stack=self.stack)
        if skipped:
            batch["skipped"].update(skipped)
        # A plain dict: the DataLoader passes a batch through default_convert, which copies a mapping and then
        # update()s the copy with its own items, and a Counter's update() adds: every count would double.
        batch["skipped"] = dict(batch["skipped"])
        good = [item for item in items if isinstance(item, dict)]
        batch.update(part=part.index, last=last, labels=[item["label"] for item in good])
        return batch

    def _folder_batches(self, part: Part) -> Iterator[dict]:
        for start in range(part.start, part.stop, self.batch_size):
            stop = min(start + self.batch_size, part.stop)
            items = []
            for index in range(start, stop):
                item = self.images[index]
                if isinstance(item, dict):
                    item["label"] = self.collection.samples[index].image_path
                items.append(item)
            yield self._batch(part, items, last=stop == part.stop)

    def _shard_batches(self, part: Part) -> Iterator[dict]:
        shard = part.shard
        skipped = SkipCounter()  # the shard's: decode problems and a cut or unreadable shard
        pending: list[dict] = []
        for offset, raw in enumerate(wds.iter_raw_samples(shard, skipped)):
            image, caption, problem = wds.decode_pair(raw, require_caption=self.tokenizer is not None)
            if problem:
                skipped[problem] += 1
                continue
            label = f"{shard.name}/{raw['__key__']}"
            try:
                pixels = self.transform(image)
            except PatchBudgetError as exc:
                log.warning("%s: %s; skipped", label, exc)
                skipped[PatchBudgetError.reason] += 1
                continue
            item = {"pixels": pixels, "index": offset, "key": label, "label": label}
            if self.tokenizer is not None:
                item["input_ids"] = self.tokenizer([caption])[0]
            pending.append(item)
            if len(pending) == self.batch_size:
                yield self._batch(part, pending, last=False)
                pending = []
        yield self._batch(part, pending, last=True, skipped=skipped)


def build_part_loader(
    collection: Collection,
    parts: Sequence[Part],
    preprocess: Preprocess,
    tokenizer: Callable | None,
    batch_size: int,
    num_workers: int,
    workers_key: str,
    pin_memory: bool = True,
) -> DataLoader:
    """Un-augmented batches of ``parts`` (see :class:`PartStream`); ``tokenizer=None`` for images only."""
    stream = PartStream(collection, parts, build_eval_transform(preprocess), tokenizer, batch_size,
                        batch_stacker(preprocess))  # fmt: skip
    workers = min(effective_workers(num_workers, workers_key), len(parts))
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory and torch.cuda.is_available(),
                      worker_init_fn=one_thread_per_worker)  # fmt: skip


def check_not_empty(collection: Collection) -> None:
    if not collection.parts:
        raise DataError(f"{collection.section}: nothing to embed")

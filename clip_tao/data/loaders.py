"""DataLoaders built from the spec: image-text batches for training/evaluation, images or texts for embedding.

A batch is a dict: ``pixels [B,3,H,W]``, ``input_ids [B,L]`` (when captions are loaded), ``indices [B]``
(positions in the dataset) and ``skipped`` (a :class:`SkipCounter` of files dropped from this batch).
An image that cannot be decoded is dropped from its batch and counted, never fatal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from clip_tao.config.schema import DatasetConfig, DatasetEntry
from clip_tao.data.custom import Sample, SkipCounter, scan_custom_datasets
from clip_tao.data.transforms import build_eval_transform, build_train_transform
from clip_tao.errors import ConfigError
from clip_tao.models.base import Preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Bad:
    """Stands in for a sample whose image could not be decoded."""

    reason: str


class ImageTextDataset(Dataset):
    """Decodes, transforms and tokenizes one :class:`Sample` at a time."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, tokenizer: Callable | None):
        self.samples = list(samples)
        self.transform = transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | _Bad:
        sample = self.samples[index]
        try:
            with Image.open(sample.image_path) as image:
                pixels = self.transform(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return _Bad("undecodable_image")
        item = {"pixels": pixels, "index": index}
        if self.tokenizer is not None and sample.caption is not None:
            item["input_ids"] = self.tokenizer([sample.caption])[0]
        return item


def collate_skipping_bad(items: list) -> dict:
    """Stack the good items; count the bad ones in ``batch["skipped"]``."""
    skipped = SkipCounter(item.reason for item in items if isinstance(item, _Bad))
    good = [item for item in items if not isinstance(item, _Bad)]
    batch: dict = {"skipped": skipped, "indices": torch.tensor([item["index"] for item in good], dtype=torch.long)}
    if good:
        batch["pixels"] = torch.stack([item["pixels"] for item in good])
        if "input_ids" in good[0]:
            batch["input_ids"] = torch.stack([item["input_ids"] for item in good])
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch``: the same order for an epoch after any restart.

    ``start_index`` skips the first samples of the permutation (resuming in the middle of an epoch).
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator)[self.start_index :].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start_index


@dataclass
class LoaderBundle:
    """A DataLoader with the samples behind it and what scanning skipped."""

    loader: DataLoader
    samples: list[Sample]
    scan_skipped: SkipCounter

    def set_epoch(self, epoch: int) -> None:
        """Re-seed shuffling and worker seeds for ``epoch`` (deterministic across restarts)."""
        sampler = self.loader.sampler
        if isinstance(sampler, EpochShuffleSampler):
            sampler.set_epoch(epoch)
            self.loader.generator.manual_seed(sampler.seed + epoch)


def effective_workers(requested: int, key: str) -> int:
    """``requested`` capped at the CPU count (TAO's default of 8 oversubscribes small machines)."""
    if requested < 0:
        raise ConfigError(f"{key}={requested} must be >= 0")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > available:
        log.info("%s=%d capped at the %d available CPUs", key, requested, available)
        return available
    return requested


def build_train_loader(data_cfg: DatasetConfig, preprocess: Preprocess, tokenizer: Callable) -> LoaderBundle:
    """Shuffled, augmented image-text batches from ``dataset.train``."""
    train = data_cfg.train
    if train.type != "custom":
        from clip_tao.errors import NotAvailableError

        raise NotAvailableError(
            f"dataset.train.type={train.type!r} is not available in this version; use custom image/caption folders"
        )
    if train.batch_size < 1:
        raise ConfigError(f"dataset.train.batch_size={train.batch_size} must be >= 1")
    samples, skipped = scan_custom_datasets(train.datasets, "dataset.train.datasets")
    dataset = ImageTextDataset(samples, build_train_transform(preprocess, data_cfg.augmentation), tokenizer)
    workers = effective_workers(train.num_workers, "dataset.train.num_workers")
    loader = DataLoader(
        dataset,
        batch_size=train.batch_size,
        sampler=EpochShuffleSampler(len(dataset), data_cfg.seed),
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),
        # Contrastive batches lose their point when tiny; keep every sample only if there is one batch.
        drop_last=len(dataset) > train.batch_size,
        generator=torch.Generator().manual_seed(data_cfg.seed),
        persistent_workers=False,
    )
    return LoaderBundle(loader, samples, skipped)


def build_eval_loader(
    entries: Sequence[DatasetEntry],
    section: str,
    preprocess: Preprocess,
    tokenizer: Callable | None,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = True,
    require_captions: bool = True,
) -> LoaderBundle:
    """Un-augmented batches in dataset order; image-only when ``require_captions`` is false."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} of {section} must be >= 1")
    samples, skipped = scan_custom_datasets(entries, section, require_captions=require_captions)
    dataset = ImageTextDataset(samples, build_eval_transform(preprocess), tokenizer if require_captions else None)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=effective_workers(num_workers, f"{section.rsplit('.', 1)[0]}.num_workers"),
        collate_fn=collate_skipping_bad,
        pin_memory=pin_memory and torch.cuda.is_available(),
    )
    return LoaderBundle(loader, samples, skipped)

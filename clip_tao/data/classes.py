"""Labelled images for zero-shot classification: a folder per class, or a list file of ``path label``."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from clip_tao.config.schema import DatasetEntry
from clip_tao.data.custom import IMAGE_EXTENSIONS, Sample
from clip_tao.data.loaders import ImageTextDataset, collate_skipping_bad, effective_workers, init_worker
from clip_tao.data.naflex import batch_stacker
from clip_tao.data.transforms import build_eval_transform
from clip_tao.errors import DataError
from clip_tao.models.base import Preprocess


def scan_labelled_images(entries: Sequence[DatasetEntry], section: str) -> tuple[list[Sample], list[int], list[str]]:
    """``(samples, labels, class_folders)``: class ``i`` is ``class_folders[i]`` (sorted folder names).

    A folder entry's classes are its immediate sub-folders (images found recursively inside each).
    An ``image_list_file`` holds ``<path relative to image_dir> <label>`` lines, the label being a class
    folder name or a class index.
    """
    if not entries:
        raise DataError(f"{section} is empty: add an entry whose image_dir holds one sub-folder per class")
    listed: list[tuple[str, str, str]] = []  # (image path, label text, where)
    for index, entry in enumerate(entries):
        where = f"{section}[{index}]"
        if not entry.image_dir or not os.path.isdir(entry.image_dir):
            raise DataError(f"{where}.image_dir {entry.image_dir!r} does not exist or is not a folder")
        listed.extend(_read_list(entry, where) if entry.image_list_file else _walk_classes(entry))
    names = sorted({label for _, label, _ in listed if not label.isdigit()})
    numbers = sorted({int(label) for _, label, _ in listed if label.isdigit()})
    if names:
        classes = names
    elif numbers:  # a list file with class indices only
        classes = [str(n) for n in range(max(numbers) + 1)]
    else:
        classes = []
    if not listed or not classes:
        raise DataError(
            f"{section} holds no labelled images: give one sub-folder per class with {', '.join(IMAGE_EXTENSIONS)} images"
        )
    lookup = {name: i for i, name in enumerate(classes)}
    samples, labels = [], []
    for path, label, where in listed:
        if label.isdigit() and not names:
            labels.append(int(label))
        elif label in lookup:
            labels.append(lookup[label])
        else:
            raise DataError(f"{where}: label {label!r} of {path} is not a class folder name")
        samples.append(Sample(path, None, path))
    return samples, labels, classes


def _walk_classes(entry: DatasetEntry) -> list[tuple[str, str, str]]:
    found = []
    for folder in sorted(os.listdir(entry.image_dir)):
        root = os.path.join(entry.image_dir, folder)
        if not os.path.isdir(root):
            continue
        for current, dirs, files in os.walk(root):
            dirs.sort()
            found.extend(
                (os.path.join(current, f), folder, entry.image_dir)
                for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
    return found


def _read_list(entry: DatasetEntry, where: str) -> list[tuple[str, str, str]]:
    if not os.path.isfile(entry.image_list_file):
        raise DataError(f"{where}.image_list_file {entry.image_list_file!r} does not exist")
    rows = []
    with open(entry.image_list_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(
                    f"{entry.image_list_file}:{number}: expected '<image path> <label>', got {line.strip()!r}"
                )
            rows.append(
                (os.path.join(entry.image_dir, parts[0].strip()), parts[1].strip(), f"{entry.image_list_file}:{number}")
            )
    return rows


def build_image_loader(
    samples: Sequence[Sample],
    preprocess: Preprocess,
    batch_size: int,
    num_workers: int,
    key: str,
    pin_memory: bool = True,
) -> DataLoader:
    """Un-augmented image batches of ``samples`` in order (undecodable images skipped and counted)."""
    return DataLoader(
        ImageTextDataset(samples, build_eval_transform(preprocess), None),
        batch_size=batch_size,
        shuffle=False,
        num_workers=effective_workers(num_workers, key),
        collate_fn=functools.partial(collate_skipping_bad, stack=batch_stacker(preprocess)),
        pin_memory=pin_memory and torch.cuda.is_available(),
        worker_init_fn=init_worker,
    )

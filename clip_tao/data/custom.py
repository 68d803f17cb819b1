"""TAO's custom format: images in ``image_dir``, one caption file per image in ``caption_dir``.

An image pairs with the caption at the same relative path (``a/x.jpg`` <-> ``a/x.txt``), so images
with the same file name in different sub-folders never collide. Problems with single files are
skipped and counted (:class:`SkipCounter`); problems with a whole dataset fail up front.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from clip_tao.config.schema import DatasetEntry
from clip_tao.data.pairs import read_negatives
from clip_tao.data.walk import walk_files_once
from clip_tao.errors import DataError
from clip_tao.pair_losses import bytes_id

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Sample:
    """One image and its caption (``None`` for image-only data)."""

    image_path: str
    caption: str | None
    key: str  # "<dataset index>/<path relative to image_dir>": unique across concatenated datasets
    extra_captions: tuple[str, ...] = ()  # further captions of a multi-caption entry
    negative_captions: tuple[str, ...] = ()  # hard negatives from the entry's negative_caption_dir
    content_id: int | None = None  # a hash of the image file's bytes (when scanned with hash_images)

    @property
    def captions(self) -> tuple[str, ...]:
        """Every caption of the image (one unless its entry has ``multi_caption: true``)."""
        return () if self.caption is None else (self.caption, *self.extra_captions)


class SkipCounter(Counter):
    """Why files were skipped: reason -> count (``missing_caption``, ``undecodable_image`` ...)."""

    def summary(self) -> str:
        return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(self.items())) or "none"


def scan_custom_datasets(
    entries: Sequence[DatasetEntry], section: str, require_captions: bool = True, hash_images: bool = False
) -> tuple[list[Sample], SkipCounter]:
    """Every usable (image, caption) pair of ``entries``, concatenated in order.

    Negative captions are read for entries with ``negative_caption_dir`` (a file that is not UTF-8 or is
    empty is skipped and counted; the sample stays, without negatives). ``hash_images`` reads every image
    file to give it a content id (duplicate detection).

    ``section`` names the spec key in errors (``dataset.train.datasets``). Raises :class:`DataError`
    when there are no entries, an ``image_dir`` or list file is missing, or nothing usable is found.
    """
    if not entries:
        raise DataError(f"{section} is empty: add at least one entry with an image_dir")
    samples: list[Sample] = []
    skipped = SkipCounter()
    for index, entry in enumerate(entries):
        where = f"{section}[{index}]"
        image_paths = _list_images(entry, where)
        caption_dir = entry.caption_dir or entry.image_dir
        if require_captions and not os.path.isdir(caption_dir):
            raise DataError(f"{where}.caption_dir {caption_dir!r} does not exist: point it at the caption files")
        negative_dir = entry.negative_caption_dir
        if negative_dir and not os.path.isdir(negative_dir):
            raise DataError(
                f"{where}.negative_caption_dir {negative_dir!r} does not exist: point it at the negative files"
            )
        found = 0
        for rel in tqdm(image_paths, desc=f"scan {where}", unit="img", leave=False, disable=len(image_paths) < 5000):
            captions: tuple[str, ...] = ()
            if require_captions:
                caption_path = os.path.join(caption_dir, os.path.splitext(rel)[0] + entry.caption_file_suffix)
                text, problem = read_caption(caption_path)
                if problem:
                    skipped[problem] += 1
                    continue
                captions = split_captions(text) if entry.multi_caption else (text,)
            first, *rest = captions or (None,)
            negatives: tuple[str, ...] = ()
            if negative_dir:
                negatives, problem = read_negatives(
                    os.path.join(negative_dir, os.path.splitext(rel)[0] + entry.caption_file_suffix)
                )
                if problem:
                    skipped[problem] += 1
            image_path = os.path.join(entry.image_dir, rel)
            content = _content_id(image_path) if hash_images else None
            samples.append(Sample(image_path, first, f"{index}/{rel}", tuple(rest), negatives, content))
            found += 1
        log.info("%s: %d samples from %s", where, found, entry.image_dir)
    if not samples:
        raise DataError(
            f"{section} holds no usable image{'-caption pairs' if require_captions else 's'} "
            f"(skipped: {skipped.summary()}); images need one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    if skipped:
        log.warning("%s: skipped %s", section, skipped.summary())
    return samples, skipped


def _content_id(path: str) -> int | None:
    """A hash of the file's bytes; ``None`` when it cannot be read (the loader counts the image then)."""
    try:
        with open(path, "rb") as f:
            return bytes_id(f.read())
    except OSError:
        return None


def read_caption(path: str) -> tuple[str | None, str | None]:
    """``(caption, None)`` or ``(None, reason)`` — UTF-8 (a BOM is allowed), surrounding space stripped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, "missing_caption"
    except OSError:
        return None, "unreadable_caption"
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    if not text:
        return None, "empty_caption"
    return text, None


def split_captions(text: str) -> tuple[str, ...]:
    """The non-empty lines of a multi-caption file, each stripped."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _list_images(entry: DatasetEntry, where: str) -> list[str]:
    """Image paths relative to ``entry.image_dir``: from ``image_list_file`` or a sorted recursive scan."""
    if not entry.image_dir:
        raise DataError(f"{where}.image_dir is required: set it to the folder of images")
    if not os.path.isdir(entry.image_dir):
        raise DataError(f"{where}.image_dir {entry.image_dir!r} does not exist or is not a folder")
    if entry.image_list_file:
        return _read_image_list(entry, where)
    return [rel for rel in walk_files_once(entry.image_dir) if rel.lower().endswith(IMAGE_EXTENSIONS)]


def _read_image_list(entry: DatasetEntry, where: str) -> list[str]:
    if not os.path.isfile(entry.image_list_file):
        raise DataError(f"{where}.image_list_file {entry.image_list_file!r} does not exist")
    with open(entry.image_list_file, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{where}.image_list_file {entry.image_list_file!r} is not UTF-8 text (line {line}): "
            "save it as UTF-8, one image path a line"
        ) from exc
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    listed = []
    for name in names:
        rel = os.path.relpath(name, entry.image_dir) if os.path.isabs(name) else name
        if name.lower().endswith(IMAGE_EXTENSIONS):
            listed.append(rel)
    return listed

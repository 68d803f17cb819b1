"""Atomic file writes: write a temporary file beside the target, then rename it over the target.

A crash or a full disk never leaves a half-written file under the final name, and never destroys
the previous version of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import yaml


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path in the target's folder; renamed to ``path`` when the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def json_safe(data: Any) -> Any:
    """``data`` with NaN and infinities as ``null`` (JSON has no such numbers; Python would write bare ``NaN``)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if hasattr(data, "item") and getattr(data, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(data.item())
    return data


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Valid JSON only: non-finite numbers are written as ``null``."""
    write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make ``target`` hold the same bytes as ``source`` (a hard link when possible), atomically."""
    with atomic_path(target) as tmp:
        os.remove(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

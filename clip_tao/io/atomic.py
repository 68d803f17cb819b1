"""Atomic file writes: write a temporary file beside the target, then rename it over the target.

A crash or a full disk never leaves a half-written file under the final name, and never destroys
the previous version of it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import yaml

from clip_tao.errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path in the target's folder; renamed to ``path`` when the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        try:
            yield tmp
            # mkstemp creates 0600; the final file gets the mode any other tool would give it (umask).
            if os.path.isfile(tmp):
                os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            reason = _write_failure(exc)
            if reason is None:
                raise
            raise OutputError(
                f"cannot write {path}: {reason} ({_free_space(folder)} free there); "
                "free some space or point results_dir at another disk"
            ) from exc
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


TEMP_SUFFIX = ".tmp"
# torch.save reports a failed write (disk full, file too large) as a RuntimeError of its zip writer.
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                errno.EFBIG: "the file is too large for this file system or limit",
                errno.EROFS: "the file system is read-only"}  # fmt: skip


def _write_failure(exc: BaseException) -> str | None:
    """Why writing failed, when it is the disk's fault (else ``None``: a bug to show in full)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return _DISK_ERRNOS[exc.errno]
    if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _TORCH_WRITE_FAILURES):
        return "the write failed (disk full?)"
    return None


def _free_space(folder: str) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    return f"{free / 2**20:.0f} MiB"


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc``), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_stale_temp_files(folder: str) -> list[str]:
    """Remove the temporary files a killed writer left in ``folder`` (call only while no one writes there)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            # Exactly the names atomic_path makes: ".<target>.<random>.tmp".
            if name.startswith(".") and name.endswith(TEMP_SUFFIX) and name.count(".") >= 3:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
                    removed.append(name)
    return removed


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

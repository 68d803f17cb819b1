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
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)  # a sharded checkpoint's folder (see replace_folder)
                    else:
                        os.remove(path)
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


# -- folders (sharded checkpoints) -------------------------------------------------------------------
def replace_folder(source: str, target: str) -> None:
    """Rename the finished folder ``source`` to ``target``; a ``target`` already there is replaced (it is renamed
    aside first, then removed: a folder cannot be renamed over a non-empty one)."""
    if not os.path.lexists(target):
        os.replace(source, target)
        return
    old = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.old{TEMP_SUFFIX}")
    remove_path(old)
    os.replace(target, old)
    os.replace(source, target)
    remove_path(old)


def remove_path(path: str) -> None:
    """Remove a file, a link or a whole folder; nothing when it is not there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def link_or_copy_tree(source: str, target: str) -> None:
    """Make the folder ``target`` hold the same files as ``source`` (hard links when possible), atomically."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(target)), f".{os.path.basename(target)}{TEMP_SUFFIX}")
    remove_path(tmp)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, tmp, copy_function=link)
    replace_folder(tmp, target)


def link_latest(source: str, link: str) -> None:
    """Point the symbolic link ``link`` at ``source`` (relative, in the same folder), atomically."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(link)), f".{os.path.basename(link)}.link{TEMP_SUFFIX}")
    remove_path(tmp)
    os.symlink(os.path.relpath(source, os.path.dirname(os.path.abspath(link))), tmp)
    if os.path.isdir(link) and not os.path.islink(link):
        remove_path(link)  # a copied folder where the link belongs
    os.replace(tmp, link)

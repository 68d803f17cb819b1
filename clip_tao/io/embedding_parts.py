"""Embeddings written part by part as they are computed, and joined at the end.

A part (see :mod:`clip_tao.data.parts`) is written in clip-retrieval's layout, which autofaiss and
clip-retrieval read as it is:

- ``img_emb/img_emb_{p}.npy``: float32 ``[n, D]`` (``p`` zero-padded to the digits of the part count);
- ``metadata/metadata_{p}.parquet``: column ``image_path`` (the file, or ``<shard>/<key>``), row for row;
- ``<markers>/part_{p}.json``: ``{"rows", "skipped", "process"}``, written last: the part is finished.

A part without any usable image has its marker only (clip-retrieval writes no file for an empty partition).
Every file is written atomically, so a killed run leaves finished parts and temporary files, never half a
part; ``<markers>/manifest.json`` says what the parts were computed from, so a run of another model or
collection never reuses them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from clip_tao.data.custom import SkipCounter
from clip_tao.io.atomic import atomic_path, clean_stale_temp_files, write_json
from clip_tao.io.embeddings import write_embeddings_streamed

if TYPE_CHECKING:
    from clip_tao.engine.embedding import PartEmbeddings

log = logging.getLogger(__name__)

LABEL_COLUMN = "image_path"  # clip-retrieval's name, for files and shard keys alike


class PartStore:
    """The parts of one run under ``data_dir`` (``img_emb/``, ``metadata/``) with markers in ``marker_dir``."""

    def __init__(self, data_dir: str, marker_dir: str, num_parts: int, manifest: dict, process: int = 0):
        self.process = process  # the rank that writes through this store (recorded in its markers)
        self.data_dir = data_dir
        self.marker_dir = marker_dir
        self.num_parts = num_parts
        self.manifest = {**manifest, "num_parts": num_parts}
        self.digits = int(math.log10(max(num_parts, 1))) + 1  # as clip-retrieval pads partition numbers

    def _name(self, part: int) -> str:
        return str(part).zfill(self.digits)

    def npy_path(self, part: int) -> str:
        return os.path.join(self.data_dir, "img_emb", f"img_emb_{self._name(part)}.npy")

    def parquet_path(self, part: int) -> str:
        return os.path.join(self.data_dir, "metadata", f"metadata_{self._name(part)}.parquet")

    def marker_path(self, part: int) -> str:
        return os.path.join(self.marker_dir, f"part_{self._name(part)}.json")

    # -- before a run (one process) -----------------------------------------------------------------------
    def prepare(self) -> int:
        """Keep the finished parts of an interrupted run of the same job, drop anything else; the number kept."""
        manifest_path = os.path.join(self.marker_dir, "manifest.json")
        previous = _read_json(manifest_path)
        if previous != self.manifest:
            if previous is not None or self._part_files():
                log.info("%s: parts of another run (other model, data or layout) removed", self.marker_dir)
            self.remove()
        for folder in (self.marker_dir, *self._data_folders()):
            os.makedirs(folder, exist_ok=True)
            clean_stale_temp_files(folder)
        write_json(manifest_path, self.manifest)
        return len(self.finished())

    def finished(self) -> set[int]:
        """Parts whose marker is there and whose files hold the rows it names."""
        done = set()
        for part in range(self.num_parts):
            marker = _read_json(self.marker_path(part))
            if marker is None:
                continue
            rows = marker.get("rows")
            if rows == 0 or (
                rows and _npy_rows(self.npy_path(part)) == rows and os.path.isfile(self.parquet_path(part))
            ):
                done.add(part)
        return done

    # -- during a run (every process, its own parts) ---------------------------------------------------------
    def write(self, result: PartEmbeddings) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = len(result.image)
        if rows:
            with atomic_path(self.npy_path(result.part)) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(result.image, dtype=np.float32))
            table = pa.table({LABEL_COLUMN: pa.array(result.labels, type=pa.string())})
            with atomic_path(self.parquet_path(result.part)) as tmp:
                pq.write_table(table, tmp)
        write_json(
            self.marker_path(result.part), {"rows": rows, "skipped": dict(result.skipped), "process": self.process}
        )

    # -- after a run (one process) ------------------------------------------------------------------------
    def totals(self) -> tuple[int, SkipCounter]:
        """Rows and skipped samples of the finished parts."""
        rows, skipped = 0, SkipCounter()
        for part in sorted(self.finished()):
            marker = _read_json(self.marker_path(part)) or {}
            rows += int(marker.get("rows", 0))
            skipped.update(marker.get("skipped", {}))
        return rows, skipped

    def blocks(self, block_rows: int = 65536) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Every row in part order, a block at a time (memory-mapped: one block is read at once)."""
        import pyarrow.parquet as pq

        for part in sorted(self.finished()):
            if not os.path.isfile(self.npy_path(part)):
                continue  # an empty part
            embeddings = np.load(self.npy_path(part), mmap_mode="r")
            labels = pq.read_table(self.parquet_path(part), columns=[LABEL_COLUMN]).column(0).to_pylist()
            for start in range(0, len(labels), block_rows):
                yield np.asarray(embeddings[start : start + block_rows]), labels[start : start + block_rows]

    def join_h5(self, path: str, dim: int) -> int:
        """TAO's ``image_embeddings.h5`` from the finished parts, streamed; the number of rows."""
        rows, _ = self.totals()
        write_embeddings_streamed(path, "image", self.blocks(), rows, dim)
        return rows

    def remove(self) -> None:
        """Remove the parts (their files, markers and manifest), nothing else in these folders."""
        for path in self._part_files():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.marker_dir, "manifest.json"))
        for folder in (self.marker_dir, *self._data_folders()):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty

    def remove_folder(self) -> None:
        """Remove the whole part folder (``data_dir``, when the parts lived in a folder of their own)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _data_folders(self) -> tuple[str, str]:
        return os.path.join(self.data_dir, "img_emb"), os.path.join(self.data_dir, "metadata")

    def _part_files(self) -> list[str]:
        img, meta = self._data_folders()
        return (glob.glob(os.path.join(img, "img_emb_*.npy")) + glob.glob(os.path.join(meta, "metadata_*.parquet"))
                + glob.glob(os.path.join(self.marker_dir, "part_*.json")))  # fmt: skip


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _npy_rows(path: str) -> int | None:
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError):
        return None

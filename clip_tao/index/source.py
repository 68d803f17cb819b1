"""Embedding files read in slices, never whole: TAO's ``image_embeddings.h5`` or a folder of ``.npy`` parts.

A folder is clip-retrieval's layout (``img_emb/img_emb_0.npy``, ... with ``metadata/metadata_0.parquet``,
..., whose ``image_path`` column names the images) or just ``.npy`` files; parts are taken in the order of
the number in their names. ``.npy`` parts are memory-mapped, ``.h5`` datasets read by slice.

Every row comes back L2-normalised (inner product = cosine); rows that are not finite (NaN, inf) or zero
come back as zeros, so they keep their row number but match nothing.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator

import numpy as np

from clip_tao.errors import DataError


class EmbeddingSource:
    """``[N, D]`` float32 rows of an embeddings file. ``key`` names the spec key in errors."""

    def __init__(self, path: str, key: str = "index.embeddings_file"):
        self.path, self.key = path, key
        if os.path.isdir(path):
            self._parts = [np.load(p, mmap_mode="r") for p in _npy_parts(path, key)]
            self._h5 = None
        elif os.path.isfile(path):
            self._parts = [self._open_h5(path)]
        else:
            raise DataError(f"{key}={path!r} does not exist: give an image_embeddings.h5 or a folder of .npy files")
        dims = {p.shape[1] if p.ndim == 2 else None for p in self._parts}
        if len(dims) != 1 or None in dims:
            raise DataError(
                f"{key}={path!r}: every part must be a 2-d [N, D] array of one D, got {sorted(map(str, dims))}"
            )
        self.dim = dims.pop()
        self._offsets = np.cumsum([0] + [p.shape[0] for p in self._parts])
        self.count = int(self._offsets[-1])
        if self.count == 0:
            raise DataError(f"{key}={path!r} holds no embeddings")

    def _open_h5(self, path: str):
        import h5py

        try:
            self._h5 = h5py.File(path, "r")
        except OSError as exc:
            raise DataError(f"{self.key}={path!r} is not an HDF5 file ({exc})") from None
        if "embeddings" not in self._h5:
            raise DataError(f"{self.key}={path!r} has no 'embeddings' dataset: write it with clip-tao inference")
        return self._h5["embeddings"]

    def __len__(self) -> int:
        return self.count

    def chunks(self, rows: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, block [<=rows, D])`` over rows ``start:stop`` (default: the whole file) in order."""
        stop = self.count if stop is None else stop
        for first in range(start, stop, rows):
            yield first, self.read(first, min(first + rows, stop))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, normalised."""
        blocks = []
        for part, offset in zip(self._parts, self._offsets[:-1]):
            lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
            if lo < hi:
                blocks.append(np.asarray(part[lo:hi], dtype=np.float32))
        return _normalised(np.concatenate(blocks) if len(blocks) > 1 else blocks[0])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order, repeats allowed), normalised: ``[len(ids), D]``."""
        ids = np.asarray(ids, dtype=np.int64)
        unique, inverse = np.unique(ids, return_inverse=True)  # h5py reads increasing indices only
        # ``unique`` is sorted, so each part's rows are one slice of it.
        bounds = np.searchsorted(unique, self._offsets)
        blocks = [
            np.asarray(part[unique[a:b] - offset], dtype=np.float32)
            for part, offset, a, b in zip(self._parts, self._offsets, bounds, bounds[1:])
            if a < b
        ]
        out = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        if not out.flags.writeable:
            out = out.copy()
        _normalise(out)
        return out if len(unique) == len(ids) and (unique == ids).all() else out[inverse]

    def labels(self) -> list[str]:
        """The image path of each row: the .h5's ``image_paths`` / ``texts``, the parquet metadata, or row numbers."""
        if self._h5 is not None:
            name = "image_paths" if "image_paths" in self._h5 else "texts" if "texts" in self._h5 else None
            if name is None:
                return [str(i) for i in range(self.count)]
            return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in self._h5[name][()]]
        return _parquet_labels(self.path, self.count, self.key)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()


def _normalised(block: np.ndarray) -> np.ndarray:
    """A normalised float32 copy (memory-mapped parts are read-only)."""
    return _normalise(np.array(block, dtype=np.float32))


def _normalise(block: np.ndarray) -> np.ndarray:
    """In place: non-finite rows to zeros, the others to unit length."""
    norms = np.linalg.norm(block, axis=1, keepdims=True)  # NaN/inf for rows that are not finite
    bad = ~np.isfinite(norms[:, 0])
    if bad.any():
        block[bad] = 0.0
        norms[bad] = 0.0
    np.divide(block, norms, out=block, where=norms > 0)
    return block


def _numbered(paths: list[str]) -> list[str]:
    def number(p: str) -> tuple[int, str]:
        found = re.findall(r"\d+", os.path.basename(p))
        return (int(found[-1]) if found else -1, p)

    return sorted(paths, key=number)


def _npy_parts(folder: str, key: str) -> list[str]:
    parts = glob.glob(os.path.join(folder, "img_emb", "*.npy")) or glob.glob(os.path.join(folder, "*.npy"))
    if not parts:
        raise DataError(f"{key}={folder!r} holds no .npy files (nor img_emb/*.npy, clip-retrieval's layout)")
    return _numbered(parts)


def _parquet_labels(folder: str, count: int, key: str) -> list[str]:
    files = _numbered(glob.glob(os.path.join(folder, "metadata", "*.parquet")))
    if not files:
        return [str(i) for i in range(count)]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{key}={folder!r}: reading metadata/*.parquet needs pyarrow: pip install pyarrow") from None
    labels: list[str] = []
    for f in files:
        table = pq.read_table(f)
        column = next((c for c in ("image_path", "url", "key") if c in table.column_names), None)
        if column is None:
            raise DataError(f"{f!r} has no image_path, url or key column to name the images")
        labels += [str(v) for v in table.column(column).to_pylist()]
    if len(labels) != count:
        raise DataError(f"{key}={folder!r}: metadata/*.parquet names {len(labels)} images, img_emb holds {count} rows")
    return labels

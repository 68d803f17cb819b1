"""TAO's embedding files: ``image_embeddings.h5`` / ``text_embeddings.h5``.

Layout: dataset ``embeddings`` (float32 ``[N, D]``, L2-normalised, gzip), dataset ``image_paths`` or
``texts`` (UTF-8 strings), attributes ``num_images``/``num_texts``, ``embedding_dim``, ``embedding_type``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import h5py
import numpy as np

from clip_tao.io.atomic import atomic_path

_LABELS = {"image": ("image_paths", "num_images"), "text": ("texts", "num_texts")}


def write_embeddings(path: str | os.PathLike, kind: str, embeddings: np.ndarray, labels: Sequence[str]) -> None:
    """Write ``embeddings`` ``[N, D]`` with their image paths (``kind="image"``) or texts (``kind="text"``)."""
    label_name, count_name = _LABELS[kind]
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
        raise ValueError(f"{len(labels)} labels for embeddings of shape {embeddings.shape}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=embeddings, compression="gzip")
        f.create_dataset(label_name, data=list(labels), dtype=h5py.string_dtype("utf-8"))
        f.attrs[count_name] = embeddings.shape[0]
        f.attrs["embedding_dim"] = embeddings.shape[1]
        f.attrs["embedding_type"] = kind


def write_embeddings_streamed(
    path: str | os.PathLike, kind: str, blocks: Iterable[tuple[np.ndarray, Sequence[str]]], rows: int, dim: int
) -> None:
    """:func:`write_embeddings`'s file from ``blocks`` of ``(embeddings [n, D], labels)`` that add up to ``rows``
    rows, written as they come: memory is one block, whatever ``rows`` is."""
    label_name, count_name = _LABELS[kind]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        # gzip as write_embeddings, at level 1 behind the byte shuffle: embeddings barely compress, and level 1
        # writes faster and smaller (standard HDF5 filters: every reader undoes them).
        embeddings = f.create_dataset("embeddings", shape=(rows, dim), dtype=np.float32, compression="gzip",
                                      compression_opts=1, shuffle=True,
                                      chunks=(max(1, min(rows, 2**18 // dim)), dim) if rows else None)  # fmt: skip
        labels = f.create_dataset(label_name, shape=(rows,), dtype=h5py.string_dtype("utf-8"))
        position = 0
        for block, names in blocks:
            n = len(block)
            if n != len(names) or position + n > rows or (n and block.shape[1] != dim):
                raise ValueError(f"block of {block.shape} with {len(names)} labels at row {position} of {rows}")
            embeddings[position : position + n] = np.asarray(block, dtype=np.float32)
            labels[position : position + n] = list(names)
            position += n
        if position != rows:
            raise ValueError(f"blocks held {position} rows, {rows} expected")
        f.attrs[count_name] = rows
        f.attrs["embedding_dim"] = dim
        f.attrs["embedding_type"] = kind


def read_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, list[str], str]:
    """``(embeddings [N, D], labels, kind)`` from a file written by :func:`write_embeddings` (or TAO)."""
    with h5py.File(path, "r") as f:
        kind = f.attrs.get("embedding_type", "image" if "image_paths" in f else "text")
        if isinstance(kind, bytes):
            kind = kind.decode()
        label_name = _LABELS[kind][0]
        labels = [s.decode("utf-8") if isinstance(s, bytes) else s for s in f[label_name][()]]
        return np.asarray(f["embeddings"][()], dtype=np.float32), labels, kind

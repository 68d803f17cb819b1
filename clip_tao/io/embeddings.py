"""TAO's embedding files: ``image_embeddings.h5`` / ``text_embeddings.h5``.

Layout: dataset ``embeddings`` (float32 ``[N, D]``, L2-normalised, gzip), dataset ``image_paths`` or
``texts`` (UTF-8 strings), attributes ``num_images``/``num_texts``, ``embedding_dim``, ``embedding_type``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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


def read_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, list[str], str]:
    """``(embeddings [N, D], labels, kind)`` from a file written by :func:`write_embeddings` (or TAO)."""
    with h5py.File(path, "r") as f:
        kind = f.attrs.get("embedding_type", "image" if "image_paths" in f else "text")
        if isinstance(kind, bytes):
            kind = kind.decode()
        label_name = _LABELS[kind][0]
        labels = [s.decode("utf-8") if isinstance(s, bytes) else s for s in f[label_name][()]]
        return np.asarray(f["embeddings"][()], dtype=np.float32), labels, kind

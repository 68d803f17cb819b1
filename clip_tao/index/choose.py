"""Which FAISS index fits a collection of ``n`` vectors of dimension ``d`` in a memory budget.

The rules follow autofaiss (clip-retrieval's index builder), which cannot be a dependency here: its package
pins ``numpy<2`` (pip downgrades the project's numpy to install it) and installs a top-level ``tests``
package. Like autofaiss: exact search for small collections, HNSW (M <= 32) when its graph fits, else a
compressed IVF index with the most bytes a vector that fits, with about ``4 sqrt(n)`` inverted lists (a
power of two; an HNSW coarse quantizer from 16,384 lists on) trained on about 64 vectors a list.
Unlike autofaiss, 8-bit scalar quantisation (IVF-SQ8, a quarter of flat's memory) comes before product
quantisation, whose recall on CLIP-like data is much lower at the same memory; and no OPQ rotation (its
training is slow on few cores).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from clip_tao.errors import ConfigError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
ID_BYTES = 8  # an inverted list stores a 64-bit id a vector
HNSW_EXTRA_BYTES = 24
PQ_BYTES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 8)  # sub-quantisers tried, most first


def parse_memory(value: str | int | float, key: str = "index.max_memory") -> int:
    """``4G``, ``512M``, ``1.5GB``, ``2GiB`` or a number of bytes -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value > 0:
            return int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.IGNORECASE)
        if match and float(match[1]) > 0:
            return int(float(match[1]) * _UNITS[match[2].upper()])
    raise ConfigError(f"{key}={value!r} is not a memory size: give bytes or a size such as 4G, 512M, 64G")


@dataclass(frozen=True)
class IndexPlan:
    """A FAISS ``index_factory`` key and what it is expected to cost."""

    key: str
    kind: str  # flat | hnsw | ivf-sq8 | ivf-pq
    estimated_bytes: int
    nlist: int = 0
    train_size: int = 0
    reason: str = ""

    @property
    def compressed(self) -> bool:
        return self.kind in ("ivf-sq8", "ivf-pq")


def flat_bytes(n: int, d: int) -> int:
    return 4 * n * d


def hnsw_bytes(n: int, d: int, m: int) -> int:
    return n * (4 * d + 8 * m + HNSW_EXTRA_BYTES)


def nlist_for(n: int) -> int:
    """Inverted lists: the power of two nearest ``4 sqrt(n)`` (faiss's guideline), each trainable by 39+ vectors."""
    lists = 2 ** round(math.log2(max(4 * math.sqrt(n), 1)))
    while lists > 1 and lists * 39 > n:
        lists //= 2
    return max(lists, 1)


def ivf_key(nlist: int, codes: str) -> str:
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= 16384 else f"IVF{nlist}"
    return f"{quantizer},{codes}"


def choose_index(n: int, d: int, max_memory: int, exact_max_vectors: int) -> IndexPlan:
    """The index for ``n`` vectors ``[n, d]`` within ``max_memory`` bytes; :class:`ConfigError` if none fits."""
    flat = flat_bytes(n, d)
    if n <= exact_max_vectors and flat <= max_memory:
        return IndexPlan("Flat", "flat", flat, reason=f"{n:,} vectors <= index.exact_max_vectors: exact search")
    # HNSW keeps the vectors plus 2M neighbour ids a vector on its bottom layer (autofaiss's estimate), and
    # (measured on FAISS's files) ~24 bytes more: level, offsets and the upper layers' links.
    m = (max_memory // n - HNSW_EXTRA_BYTES - 4 * d) // 8
    if m >= 8:
        m = min(m, 32)
        return IndexPlan(f"HNSW{m}", "hnsw", hnsw_bytes(n, d, m), reason=f"HNSW{m}'s graph fits the budget")
    nlist = nlist_for(n)
    centroids = 4 * nlist * d + (4 * nlist * 64 if nlist >= 16384 else 0)
    train_size = min(n, max(64 * nlist, 10_000))
    sq8 = n * (d + ID_BYTES) + centroids
    if sq8 <= max_memory:
        return IndexPlan(ivf_key(nlist, "SQ8"), "ivf-sq8", sq8, nlist, train_size, "8-bit scalar codes fit")
    codebooks = 4 * 256 * d
    for m in PQ_BYTES:
        if m > d // 2 or d % m:
            continue
        pq = n * (m + ID_BYTES) + centroids + codebooks
        if pq <= max_memory:
            # PQ's 256-centroid codebooks want 39+ vectors each; "np": no polysemous training (unused, and slow).
            return IndexPlan(ivf_key(nlist, f"PQ{m}np"), "ivf-pq", pq, nlist, max(train_size, min(n, 9984)),
                             f"{m}-byte product-quantised codes fit")  # fmt: skip
    smallest = n * (8 + ID_BYTES) + centroids + codebooks
    raise ConfigError(
        f"index.max_memory={max_memory:,} bytes is below the smallest index of {n:,} x {d} vectors "
        f"(IVF-PQ8, about {smallest:,} bytes): raise index.max_memory"
    )


def plan_for_key(key: str, n: int, d: int) -> IndexPlan:
    """An :class:`IndexPlan` for a user's own ``index.index_key`` (any ``faiss.index_factory`` string)."""
    found = re.search(r"IVF(\d+)", key)
    nlist = int(found[1]) if found else 0
    kind = "flat" if key == "Flat" else "hnsw" if key.startswith("HNSW") else "ivf-pq" if "PQ" in key else "ivf-sq8"
    if nlist and "SQ" not in key and "PQ" not in key:
        kind = "ivf-flat"
    train_size = min(n, max(64 * nlist, 10_000)) if nlist or "PQ" in key or "SQ" in key else 0
    return IndexPlan(key, kind, 0, nlist, train_size, "index.index_key")

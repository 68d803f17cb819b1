"""Pictures of a task's results (PNG, written atomically): R@K curves, rank histograms, confusion
matrices, training curves. matplotlib with its file-only backend: no display needed."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from clip_tao.io.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def recall_at_k_png(ranks: Mapping[str, np.ndarray], path: str | os.PathLike, max_k: int = 50) -> None:
    """R@K (percent) for K = 1..max_k, one curve per direction (``{"i2t": ranks, "t2i": ranks}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = np.arange(1, max_k + 1)
    for direction, r in ranks.items():
        r = np.asarray(r)
        ax.plot(ks, [(r <= k).mean() * 100 for k in ks], label=f"{direction} ({len(r)} queries)")
    ax.set(xlabel="K", ylabel="R@K (%)", title="Recall at K", ylim=(0, 100), xscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def rank_bins(max_rank: int, exact_up_to: int = 10, log_bins: int = 20) -> np.ndarray:
    """Histogram edges for integer ranks 1..``max_rank``: one bin a rank up to ``exact_up_to`` (ranks 2 and 3
    are never merged), then log-spaced bins; every edge sits half-way between integers."""
    exact = min(max_rank, exact_up_to)
    edges = np.arange(exact + 1) + 0.5
    if max_rank > exact:
        wide = np.floor(np.logspace(np.log10(exact + 1), np.log10(max_rank), log_bins)) + 0.5
        edges = np.unique(np.concatenate([edges, wide, [max_rank + 0.5]]))
    return edges


def rank_histogram_png(ranks: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Histogram of the first-hit rank per query (see :func:`rank_bins`), one panel per direction."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ranks), figsize=(5 * len(ranks), 3.5), squeeze=False)
    for ax, (direction, r) in zip(axes[0], ranks.items()):
        r = np.asarray(r)
        ax.hist(r, bins=rank_bins(int(r.max()) if r.size else 1))
        ax.set(xscale="log", xlabel="rank of the first relevant result", ylabel="queries", title=direction)
    _save(fig, path)


def confusion_matrix_png(matrix: np.ndarray, classnames: Sequence[str], path: str | os.PathLike) -> None:
    """Row-normalised confusion matrix (true class per row); names shown when there are few classes."""
    plt = _pyplot()
    n = len(classnames)
    rows = matrix.sum(1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(min(2 + 0.4 * n, 20), min(2 + 0.4 * n, 20)))
    image = ax.imshow(matrix / rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046)
    if n <= 40:
        ax.set_xticks(range(n), classnames, rotation=90)
        ax.set_yticks(range(n), classnames)
    ax.set(xlabel="predicted", ylabel="true", title="Zero-shot confusion matrix")
    _save(fig, path)


def training_curves_png(history: Sequence[Mapping], path: str | os.PathLike) -> None:
    """Loss, learning rate and validation figures per epoch, from the trainer's history."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    panels = [("train_loss", "training loss"), ("lr", "learning rate")]
    figures = [k for k in ("t2i_R@1", "i2t_R@1", "t2i_mAP", "i2t_mAP") if any(k in h for h in history)]
    fig, axes = plt.subplots(1, 3 if figures else 2, figsize=(15 if figures else 10, 3.5))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker=".")
        ax.set(xlabel="epoch", title=title)
    if figures:
        for key in figures:
            points = [(h["epoch"], h[key]) for h in history if key in h]
            ax = axes[2]
            ax.plot(*zip(*points), marker="o", label=key)
        axes[2].set(xlabel="epoch", ylabel="%", title="validation")
        axes[2].legend()
    _save(fig, path)

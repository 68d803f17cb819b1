"""Guards against NaN and infinity: a diverged model must fail loudly, never be scored or saved as best.

A NaN embedding compares false with everything, so rankings built from it are meaningless (and can read
as perfect); a NaN weight spreads to every output. The checks here stop the task with one line instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clip_tao.errors import ModelError, TrainingError

DIVERGED_FIX = "lower train.optim.vision_lr / text_lr, set train.grad_clip_norm, or train with precision=bf16/fp32"


def check_weights(state: Mapping[str, torch.Tensor], step: int, last_checkpoint: str | None) -> None:
    """Raise :class:`TrainingError` when a floating-point tensor of a state dict holds NaN or infinity."""
    bad = [
        name
        for name, t in state.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise TrainingError(
            f"training diverged at step {step}: {len(bad)} weight tensors hold NaN/inf (e.g. {bad[0]}), "
            f"not saved ({_kept(last_checkpoint)}); {DIVERGED_FIX}"
        )


def _kept(last_checkpoint: str | None) -> str:
    return f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"


def overflow_error(exc: RuntimeError, step: int, last_checkpoint: str | None) -> TrainingError | None:
    """The one-line error for an optimiser step that overflowed float32 (a huge learning rate), else None."""
    if "overflow" not in str(exc):
        return None
    return TrainingError(
        f"training diverged at step {step}: the optimiser's update overflowed float32 ({_kept(last_checkpoint)}); "
        f"{DIVERGED_FIX}"
    )


def check_embeddings(embeddings: torch.Tensor | None, what: str) -> None:
    """Raise :class:`ModelError` when any row of ``[N, D]`` ``embeddings`` is not finite."""
    if embeddings is None or embeddings.numel() == 0:
        return
    bad = int((~torch.isfinite(embeddings)).any(dim=-1).sum())
    if bad:
        raise ModelError(
            f"the model produced NaN/inf for {bad} of {len(embeddings)} {what} embeddings: its weights are not "
            "finite (a diverged training?); use an earlier checkpoint"
        )

"""Shared-memory pixel buffers of whole steps, which the shard loader's workers fill in place.

With several loader workers, each decodes its share of every step (see :class:`clip_tao.data.wds.StreamPlan`).
Sent through the DataLoader, the shares arrive as separate tensors, which the training process would copy into
one batch: where every core runs a worker, that copy is time taken from them. Instead, the training process
allocates a few step-sized buffers in shared memory before the workers start; each worker stacks its share
straight into the step's buffer, at its own rows, and the training process hands the buffer out as the step's
pixels. Nothing is copied.

A buffer is written again only when nothing holds the batch that used it. The training process counts the
references to the buffer's storage (a batch, a slice of it, autograd's saved input all hold one) and only then
lets the step that reuses the buffer write into it. A worker whose buffer is not free yet sends its share as a
tensor of its own, and that step is joined by a copy, as without buffers: slower, never wrong. In the usual
loop (one batch held while the next is fetched) buffers are always free in time.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Steps a worker runs ahead of the training process (the DataLoader's prefetch_factor, 2) plus the batch the
# training loop holds while it asks for the next, plus one to spare.
SLOTS = 5


def _storage_users(tensor: torch.Tensor) -> int:
    """References to the tensor's storage (tensors and views sharing it), this call's own one included."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def available() -> bool:
    """Whether this PyTorch can count a storage's references (a private function, also used by Inductor)."""
    return callable(getattr(torch._C, "_storage_Use_Count", None))


class StepBuffers:
    """``SLOTS`` buffers of ``[rows, *pixel_shape]``; step ``s`` uses buffer ``s % SLOTS``.

    Shared with the workers: ``allowed[slot]``, the step that may write the buffer next (written only by the
    training process). Kept by the training process: the last step handed out from each buffer.
    """

    def __init__(self, rows: int, pixel_shape: tuple[int, ...], dtype: torch.dtype, first_step: int):
        self.rows = rows
        self.first_step = first_step
        self.tensors = [torch.empty((rows, *pixel_shape), dtype=dtype).share_memory_() for _ in range(SLOTS)]
        # The first steps of the epoch (from first_step) find their buffers free.
        self.allowed = torch.tensor([first_step + (slot - first_step) % SLOTS for slot in range(SLOTS)])
        self.allowed.share_memory_()
        self.handed_out = [-1] * SLOTS
        self.free_users = _storage_users(self.tensors[0])

    # -- in a worker ---------------------------------------------------------------------------------
    def claim(self, step: int, offset: int, count: int) -> torch.Tensor | None:
        """The rows of ``step``'s buffer this worker's share goes to, or ``None`` while the buffer is held."""
        slot = step % SLOTS
        if int(self.allowed[slot]) != step:
            return None
        return self.tensors[slot][offset : offset + count]

    # -- in the training process ---------------------------------------------------------------------
    def release_free(self) -> None:
        """Let the next step of every buffer that nothing holds any more write into it."""
        for slot, step in enumerate(self.handed_out):
            if step >= 0 and int(self.allowed[slot]) <= step and _storage_users(self.tensors[slot]) == self.free_users:
                self.allowed[slot] = step + SLOTS

    def pixels(self, step: int, shares: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor:
        """The pixels of ``step`` from its shares in order (``None``: written into the buffer)."""
        slot = step % SLOTS
        self.handed_out[slot] = step
        buffer = self.tensors[slot]
        if all(share is None for share in shares):
            return buffer[:]  # a view: what holds the batch holds the buffer's storage
        # Some shares came as tensors (their buffer was held): join this step by a copy, which frees the buffer.
        parts, start = [], 0
        for share, size in zip(shares, sizes):
            parts.append(buffer[start : start + size] if share is None else share)
            start += size
        log.debug("step %d: a loader worker found its buffer held: this step's pixels are copied", step)
        return torch.cat(parts)

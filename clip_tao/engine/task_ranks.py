"""One task run by every process of a torchrun job (or by a single process): the folder is claimed and
prepared by rank 0 alone, and only rank 0 writes ``status.json``."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

from clip_tao.config.schema import ExperimentConfig
from clip_tao.engine.distributed import DistContext, barrier, cleanup_distributed, setup_distributed
from clip_tao.io.status import StatusWriter
from clip_tao.io.task_dir import claim_task_dir, prepare_task_dir

# Ranks wait for each other's parts at the end of an embedding pass: allow for a slow share.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)


@contextlib.contextmanager
def task_on_ranks(cfg: ExperimentConfig, task: str) -> Iterator[tuple[DistContext, str, StatusWriter]]:
    """``(this process's place, the task folder, its status writer)`` for the length of the task."""
    ctx = setup_distributed(getattr(cfg, task), timeout=COLLECTIVE_TIMEOUT)
    try:
        with contextlib.ExitStack() as claims:
            folder = cfg.task_dir(task)
            if ctx.is_main:
                # One run a folder: a second one would mix its parts and status lines with this one's.
                claims.enter_context(claim_task_dir(folder, task))
                folder, status = prepare_task_dir(cfg, task)
            barrier(ctx)  # the folder exists before any rank writes into it
            if not ctx.is_main:
                status = StatusWriter(folder, enabled=False)
            yield ctx, folder, status
    finally:
        cleanup_distributed()

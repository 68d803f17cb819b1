"""CPU threads: the main process gets the CPUs it may use, left over by its loader workers; each worker one.

A process that starts more compute threads than it has CPUs (or than its cgroup quota lets it run) spends
its time waiting: every parallel operation ends at a barrier that a descheduled thread holds up. On a
busy 2-core machine that made a small training run 10x slower. So:

- the main process runs ``train.num_threads`` threads when set, else what ``OMP_NUM_THREADS`` says when
  set, else the CPUs it is allowed (affinity mask and cgroup quota, shared by the ranks of this node) less
  one for each loader worker running beside it, at least one. Training and validation count their own
  workers (:func:`main_process_threads_during`): a run's validation workers do not run while it trains;
- each loader worker runs one thread for PyTorch, and tells OpenMP, MKL, OpenBLAS and OpenCV the same.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def allowed_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota when there is one."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(count, math.ceil(quota))) if quota else count


def _cgroup_quota() -> float | None:
    """CPUs of the cgroup's quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), ``None`` when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def main_process_threads(requested: int | None, loader_workers: int) -> int:
    """How many threads the main process should compute with (see the module's docstring)."""
    if requested is not None:
        if requested < 1:
            from clip_tao.errors import ConfigError

            raise ConfigError(f"train.num_threads={requested} must be >= 1 (or null for the automatic choice)")
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, allowed_cpus() // max(ranks_here, 1) - loader_workers)


def set_main_process_threads(requested: int | None, loader_workers: int) -> int:
    """Apply :func:`main_process_threads` to PyTorch; returns the count."""
    threads = main_process_threads(requested, loader_workers)
    torch.set_num_threads(threads)
    log.debug("main process: %d compute threads (%d loader workers)", threads, loader_workers)
    return threads


@contextlib.contextmanager
def main_process_threads_during(requested: int | None, loader_workers: int) -> Iterator[int]:
    """:func:`set_main_process_threads` for a phase of a task (validation with its own workers), then
    the thread count from before."""
    before = torch.get_num_threads()
    try:
        yield set_main_process_threads(requested, loader_workers)
    finally:
        torch.set_num_threads(before)


def one_thread_per_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: one thread for each library a worker may run."""
    torch.set_num_threads(1)
    for name in THREAD_VARIABLES:  # read by libraries that start their pools after this point
        os.environ[name] = "1"
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(1)

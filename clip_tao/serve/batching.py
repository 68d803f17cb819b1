"""Dynamic batching: gather concurrent requests into one model call, as Triton's dynamic batcher does.

Each request brings ``n`` items (rows of an array, or texts). A worker takes the oldest request, then keeps
adding waiting requests until ``max_batch_size`` items are gathered or ``max_queue_delay_ms`` has passed
since that first request arrived, runs the model once on the lot in its own thread (so the event loop keeps
accepting requests meanwhile), and hands each request its own rows of the result. A request is never split.
With batching off every request is one model call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """Triton's counters: ``inference_count`` items in ``execution_count`` model calls."""

    inference_count: int = 0
    execution_count: int = 0
    success_ns: int = 0
    compute_ns: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # items in a call -> how many calls


@dataclass
class _Job:
    items: np.ndarray | list
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    """``await submit(items)`` -> ``run_batch(items)`` for just these items, computed in a gathered batch.

    ``run_batch`` takes a numpy array ``[N, ...]`` or a list of N items and returns an array ``[N, ...]``;
    calls to it never overlap (one worker thread), so it need not be thread-safe.
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray | list], np.ndarray],
        max_batch_size: int,
        max_queue_delay_ms: float,
        enabled: bool = True,
        name: str = "model",
    ):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay = max(max_queue_delay_ms, 0.0) / 1000
        self.enabled = enabled
        self.name = name
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(), name=f"{self.name}-batcher")

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker."""
        if self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None
        self._executor.shutdown(wait=True)

    async def submit(self, items: np.ndarray | Sequence) -> np.ndarray:
        if self._queue is None:
            raise RuntimeError(f"the {self.name} batcher is not started")
        if len(items) > self.max_batch_size:  # callers check first; this keeps a batch within its bound
            raise ValueError(f"{len(items)} items exceed max_batch_size {self.max_batch_size}")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(items, future, time.monotonic()))
        return await future

    async def _work(self) -> None:
        queue = self._queue
        pending: _Job | None = None  # a request that did not fit the previous batch
        while True:
            first = pending or await queue.get()
            pending = None
            jobs, count = [first], len(first.items)
            if self.enabled:
                deadline = first.arrived + self.max_delay
                while count < self.max_batch_size:
                    timeout = deadline - time.monotonic()
                    try:
                        job = queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
                    except (asyncio.QueueEmpty, asyncio.TimeoutError):
                        break
                    if count + len(job.items) > self.max_batch_size:
                        pending = job
                        break
                    jobs.append(job)
                    count += len(job.items)
            try:
                await self._run(jobs, count)
            finally:
                for _ in jobs:
                    queue.task_done()

    async def _run(self, jobs: list[_Job], count: int) -> None:
        if isinstance(jobs[0].items, np.ndarray):
            batch = np.concatenate([j.items for j in jobs]) if len(jobs) > 1 else jobs[0].items
        else:
            batch = [item for j in jobs for item in j.items]
        start = time.perf_counter_ns()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, batch)
        except Exception as exc:  # every request of the batch gets the error; the worker carries on
            log.exception("%s: a batch of %d failed", self.name, count)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        elapsed = time.perf_counter_ns() - start
        s = self.stats
        s.inference_count += count
        s.execution_count += 1
        s.compute_ns += elapsed
        s.batch_sizes[count] = s.batch_sizes.get(count, 0) + 1
        offset = 0
        for job in jobs:
            n = len(job.items)
            if not job.future.done():  # the client may have gone away
                job.future.set_result(result[offset : offset + n])
            offset += n

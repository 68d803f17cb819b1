"""The dynamic batcher alone: requests are gathered within the bounds, each gets its own rows, errors stay local."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from clip_tao.serve.batching import DynamicBatcher


class Recorder:
    """A model that doubles its input and records the batch sizes it was called with, from one thread only."""

    def __init__(self, fail_on: float | None = None):
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.fail_on = fail_on

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        self.threads.add(threading.get_ident())
        if self.fail_on is not None and self.fail_on in batch:
            raise RuntimeError("bad item")
        return batch * 2


async def _submit_all(batcher: DynamicBatcher, requests: list[np.ndarray]):
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
    finally:
        await batcher.stop()


def _requests(sizes: list[int]) -> list[np.ndarray]:
    start, out = 0, []
    for n in sizes:
        out.append(np.arange(start, start + n, dtype=np.float32)[:, None])
        start += n
    return out


@pytest.mark.parametrize("enabled", [True, False])
def test_requests_are_gathered_up_to_max_batch_and_never_mixed(enabled):
    sizes = [1, 3, 2, 4, 1, 1, 2, 3, 1, 2]
    model = Recorder()
    batcher = DynamicBatcher(model, max_batch_size=5, max_queue_delay_ms=200, enabled=enabled)
    requests = _requests(sizes)
    results = asyncio.run(_submit_all(batcher, requests))
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result, request * 2)
    assert sum(model.calls) == sum(sizes) and len(model.threads) == 1
    if enabled:
        assert max(model.calls) <= 5 and len(model.calls) < len(sizes)
        assert batcher.stats.execution_count == len(model.calls) and batcher.stats.inference_count == sum(sizes)
    else:
        assert model.calls == sizes


def test_a_failing_batch_fails_only_its_requests_and_the_batcher_carries_on():
    model = Recorder(fail_on=4.0)
    batcher = DynamicBatcher(model, max_batch_size=2, max_queue_delay_ms=0, enabled=False)
    results = asyncio.run(_submit_all(batcher, _requests([2, 2, 2, 1])))  # item 4.0 is in the third request
    assert isinstance(results[2], RuntimeError)
    for i in (0, 1, 3):
        assert isinstance(results[i], np.ndarray)


def test_the_queue_delay_bounds_the_wait_of_a_lone_request():
    async def lone() -> float:
        batcher = DynamicBatcher(Recorder(), max_batch_size=64, max_queue_delay_ms=50)
        await batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit(np.zeros((1, 1), np.float32))
        waited = loop.time() - start
        await batcher.stop()
        return waited

    assert 0.04 <= asyncio.run(lone()) < 5  # it waited for company, then ran alone

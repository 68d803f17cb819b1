"""Runs ``clip-tao`` (the real command) held in one phase of training, for the signal tests (test_stopping.py).

``HOLD_PHASE`` names the phase, ``HOLD_DIR`` a folder: the run writes ``held`` there (with its pid) when it
enters the phase; a test that writes ``release`` there lets it go on. The hold only makes the phase last:

- ``fork``: the main process's first fork of a loader worker lasts (a fork hook, as logging registers one);
- ``worker_exit``: each loader worker's exit lasts (a multiprocessing finaliser that blocks in ``open``);
- ``checkpoint``: the first checkpoint's write blocks in ``open`` (a hung file system);
- ``collective``: rank 1 waits before its first step, so rank 0 sits in the step's collective;
- ``step``: the step that trains logged step ``HOLD_STEP`` waits until a stop signal has reached the process, then
  runs (what a preemption's SIGTERM meets mid-run, whatever the machine's speed); once a run: a ``held`` file
  already there (a resumed run) holds nothing.

Loader waits and validation need no hold here: a FIFO among the images blocks the worker that opens it.
"""

from __future__ import annotations

import os
import sys
import time

PHASE = os.environ["HOLD_PHASE"]
FOLDER = os.environ["HOLD_DIR"]


def _mark() -> None:
    path = os.path.join(FOLDER, "held")
    with open(path + f".{os.getpid()}.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + f".{os.getpid()}.tmp", path)


def _wait_for_release(limit: float) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(os.path.join(FOLDER, "release")) and time.monotonic() < deadline:
        time.sleep(0.05)


def _block_in_open() -> None:
    """Wait in the kernel: open a FIFO that nobody writes."""
    fifo = os.path.join(FOLDER, f"never-written-{os.getpid()}")
    os.mkfifo(fifo)
    with open(fifo, "rb"):
        pass


def _hold_fork() -> None:
    from clip_tao.engine.trainer import Trainer

    fit = Trainer.fit
    held = []

    def after_fork_in_parent() -> None:
        if not held:
            held.append(True)
            _mark()
            _wait_for_release(60)

    def holding_fit(self):
        os.register_at_fork(after_in_parent=after_fork_in_parent)  # the next fork starts a loader worker
        return fit(self)

    Trainer.fit = holding_fit


def _hold_worker_exit() -> None:
    import multiprocessing.util

    import clip_tao.data.loaders as loaders

    init_worker = loaders.init_worker

    def holding_init(worker_id: int) -> None:
        init_worker(worker_id)
        multiprocessing.util.Finalize(None, _held_exit, exitpriority=100)  # runs when the worker ends

    def _held_exit() -> None:
        _mark()
        _block_in_open()

    loaders.init_worker = holding_init


def _hold_checkpoint() -> None:
    import torch

    import clip_tao.engine.trainer as trainer

    save_checkpoint, torch_save = trainer.save_checkpoint, torch.save

    def holding_torch_save(obj, f, *args, **kwargs):
        torch.save = torch_save
        with open(os.path.join(FOLDER, "temp-file"), "w") as out:
            out.write(str(f))
        _mark()
        _block_in_open()
        return torch_save(obj, f, *args, **kwargs)

    def holding_save_checkpoint(path, state):
        torch.save = holding_torch_save
        try:
            return save_checkpoint(path, state)
        finally:
            torch.save = torch_save

    trainer.save_checkpoint = holding_save_checkpoint


def _hold_collective() -> None:
    import clip_tao.engine.distributed as distributed
    from clip_tao.engine.trainer import Trainer

    if os.environ.get("RANK") == "0":
        all_reduce_min = distributed.all_reduce_min

        def marking_all_reduce_min(ctx, value):
            _mark()
            return all_reduce_min(ctx, value)

        distributed.all_reduce_min = marking_all_reduce_min
    else:

        def waiting_step(self, micro):
            _wait_for_release(600)
            raise SystemExit("released")

        Trainer._step = waiting_step


def _hold_step() -> None:
    from clip_tao import stopping
    from clip_tao.engine.trainer import Trainer

    step, at = Trainer._step, int(os.environ["HOLD_STEP"])
    if os.path.exists(os.path.join(FOLDER, "held")):
        return

    def holding_step(self, micro):
        Trainer._step = step
        if self.state.global_step == at:
            _mark()
            deadline = time.monotonic() + 300
            while stopping.requested() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            Trainer._step = holding_step
        return step(self, micro)

    Trainer._step = holding_step


HOLDS = {"fork": _hold_fork, "worker_exit": _hold_worker_exit, "checkpoint": _hold_checkpoint,
         "collective": _hold_collective, "step": _hold_step, "none": lambda: None}  # fmt: skip

if __name__ == "__main__":
    HOLDS[PHASE]()
    from clip_tao.cli import main

    sys.argv[0] = "clip-tao"
    raise SystemExit(main())  # as the program does (main reads sys.argv)

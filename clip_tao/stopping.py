"""Stopping on SIGINT (Ctrl-C) and SIGTERM: a stop that was asked for is never lost.

Python runs a signal's handler in the main thread at its next bytecode, wherever that is, and the handler's
``KeyboardInterrupt`` unwinds from there. Where that code is one whose exceptions the interpreter drops, the
interruption is printed as "Exception ignored in ..." and the run goes on as if nothing happened: a fork hook
(``os.register_at_fork``; logging registers one), a ``__del__`` (a DataLoader iterator shutting its workers
down), a generator or weakref finaliser. Training forks its DataLoader workers for every epoch and every
validation, and forking a large process on a busy machine is slow; a signal that arrives during the fork is
handled in logging's after-fork hook, right after it, and was lost there. So:

- The handler records the stop before it raises. Until the interruption has reached code that acts on it
  (:func:`acknowledge`), a watchdog thread delivers the signal again every ``RETRY_S`` seconds: one that was
  dropped is raised again a moment later.
- DataLoader workers start inside :func:`deferred`: a signal that comes meanwhile is raised once they have
  started, in ordinary code, never inside a fork hook.
- Loader workers ignore SIGINT (:func:`in_loader_worker`): a terminal's Ctrl-C reaches the whole process
  group, but the main process decides and stops them. Once stopping, a worker that dies is no error: torch's
  SIGCHLD check is switched off, so its RuntimeError cannot replace the interruption or land in the final
  status write.
- A main thread stuck in a C call that signals cannot interrupt (a collective whose peer never comes) never
  runs the Python handler; the watchdog learns of the signal from Python's wakeup fd (the C handler writes
  to it at once) and ends the process ``FORCE_S`` seconds later: the registered :func:`last_words` (the
  final status line, the release of the results folder) run first, then the loader workers are stopped.

Preemption (:func:`checkpoint_first`): inside the training loop of a run that asked for it (under Slurm by
default), SIGTERM does not interrupt at once. It is recorded, the step in progress finishes, the trainer writes a
checkpoint (:func:`checkpoint_requested`) and then stops as for any signal: a requeued job continues from that
step. A run that reaches no step boundary within ``GRACE_S`` seconds is stopped as usual.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RETRY_S = 2.0  # a stop not acted on by then was dropped somewhere: deliver it again
FORCE_S = 15.0  # still running this long after the signal: the main thread is stuck in C; exit
GRACE_S = 60.0  # SIGTERM inside checkpoint_first(): the longest wait for the step in progress and its checkpoint

_requested: int | None = None  # the first stop signal the main thread has handled
_arrived: int | None = None  # the first stop signal, as the watchdog learnt of it (even if the main thread did not)
_arrived_at = 0.0
_delivered_at = 0.0
_acknowledged = False
_deferring = False  # inside deferred()
_installed = False
_watchdog: threading.Thread | None = None
_wakeup_write_fd = -1
_last_words: list[Callable[[], None]] = []
_checkpoint_first = False  # inside checkpoint_first()
_checkpoint_pending = False  # a SIGTERM waits there for the step's end


def requested() -> str | None:
    """The name of the signal that asked this process to stop (``"SIGINT"``), or ``None``."""
    signum = _requested or _arrived
    return None if signum is None else signal.Signals(signum).name


def acknowledge() -> None:
    """The interruption reached code that stops the task: no more deliveries; further signals are ignored
    so that the final status line and the release of the output are not interrupted in turn."""
    global _acknowledged
    if _requested is not None or _arrived is not None:
        _acknowledged = True


@contextlib.contextmanager
def install() -> Iterator[None]:
    """Handle SIGTERM, and SIGINT unless it was ignored when the process started (a background job)."""
    global _installed, _requested, _arrived, _acknowledged
    if threading.current_thread() is not threading.main_thread() or _installed:
        yield
        return
    _requested, _arrived, _acknowledged = None, None, False
    previous = {}
    for signum in STOP_SIGNALS:
        if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
            if os.environ.get("RANK", "0") in ("", "0"):
                log.warning("Ctrl-C is ignored here (started in the background): stop with SIGTERM (kill %d)",
                            os.getpid())  # fmt: skip
            continue
        previous[signum] = signal.signal(signum, _on_signal)
    _start_watchdog()
    # Python writes each signal's number to this pipe from the C handler, at once: the watchdog learns of a
    # stop even while the main thread is inside a C call and has not run the Python handler.
    previous_wakeup = signal.set_wakeup_fd(_wakeup_write_fd, warn_on_full_buffer=False)
    _installed = True
    try:
        yield
    finally:
        _installed = False
        signal.set_wakeup_fd(previous_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def last_words(callback: Callable[[], None]) -> Iterator[None]:
    """Run ``callback`` (from another thread) if the process has to be ended while the block runs."""
    _last_words.append(callback)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _last_words.remove(callback)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block (starting loader workers: forking) a stop is recorded but raised only when the block
    ends. Blocking the signals would not do: the kernel then hands them to another thread, and Python still
    runs the handler in the main thread at its next bytecode, which may be in a fork hook."""
    global _deferring
    if not _installed or threading.current_thread() is not threading.main_thread() or _deferring:
        yield
        return
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
    if _requested is not None and not _acknowledged:
        raise KeyboardInterrupt(signal.Signals(_requested).name)


@contextlib.contextmanager
def checkpoint_first(enabled: bool = True) -> Iterator[None]:
    """Within the block (the training loop) a SIGTERM waits for the trainer: see :func:`checkpoint_requested`."""
    global _checkpoint_first
    if not enabled or not _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, _checkpoint_first = _checkpoint_first, True
    try:
        yield
    finally:
        _checkpoint_first = outer


def checkpoint_requested() -> bool:
    """A SIGTERM came inside :func:`checkpoint_first`: write a checkpoint now, then call :func:`stop_now`."""
    return _checkpoint_pending


def stop_now() -> None:
    """Raise the stop that :func:`checkpoint_requested` held back."""
    global _checkpoint_pending
    if _checkpoint_pending:
        _checkpoint_pending = False
        raise KeyboardInterrupt(signal.Signals(_requested).name)


def in_loader_worker() -> None:
    """In a DataLoader worker: ignore SIGINT; the main process stops the workers (torch's own SIGTERM handler
    ends a worker that its parent terminates)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # the pipe is the main process's watchdog's


def _on_signal(signum: int, frame) -> None:
    global _requested, _arrived, _arrived_at, _delivered_at, _checkpoint_pending
    if _acknowledged:
        return
    now = time.monotonic()
    if _arrived is None:
        _arrived, _arrived_at = signum, now
    if _requested is None:
        _requested = signum
        if _checkpoint_first and signum == signal.SIGTERM:
            _checkpoint_pending = True
        else:
            _quiet_worker_checks()
    _delivered_at = now
    if _deferring or (_checkpoint_pending and signum == signal.SIGTERM and now - _arrived_at < GRACE_S):
        return
    _checkpoint_pending = False
    raise KeyboardInterrupt(signal.Signals(_requested).name)


def _quiet_worker_checks() -> None:
    """Stopping: a loader worker that ends is expected; torch's SIGCHLD handler would raise at a random place.
    It gives way to a handler that does nothing, not to SIG_DFL: a SIGCHLD that arrived just before and waits
    for the interpreter would otherwise be reported as "Signal 17 ignored due to race condition"."""
    if callable(signal.getsignal(signal.SIGCHLD)):
        signal.signal(signal.SIGCHLD, _ignore)


def _ignore(signum: int, frame) -> None:
    pass


def _start_watchdog() -> None:
    """One watchdog thread and its pipe for the life of the process (tests run the command many times)."""
    global _watchdog, _wakeup_write_fd
    if _watchdog is not None:
        return
    read_fd, _wakeup_write_fd = os.pipe()
    os.set_blocking(_wakeup_write_fd, False)  # as set_wakeup_fd requires
    _watchdog = threading.Thread(target=_watch, args=(read_fd,), name="clip-tao-stop-watchdog", daemon=True)
    _watchdog.start()


def _watch(read_fd: int) -> None:
    global _arrived, _arrived_at, _delivered_at
    main = threading.main_thread().ident
    while True:
        ready, _, _ = select.select([read_fd], [], [], 0.2)
        if ready:
            for signum in os.read(read_fd, 512):
                if signum in STOP_SIGNALS and _installed and _arrived is None:
                    _arrived, _arrived_at = signum, time.monotonic()
        if _arrived is None or not _installed:
            continue
        now = time.monotonic()
        if now - _arrived_at > (GRACE_S + FORCE_S if _checkpoint_pending else FORCE_S):
            _force_exit()
        if not _acknowledged and now - max(_delivered_at, _arrived_at) > RETRY_S:
            _delivered_at = now
            signal.pthread_kill(main, _arrived)  # a real signal: it also ends a blocking system call


def _force_exit() -> None:
    name = requested()
    print(f"clip-tao: still running {FORCE_S:.0f} s after {name}, inside a call that signals cannot interrupt: "
          "exiting now", file=sys.stderr, flush=True)  # fmt: skip
    for callback in reversed(_last_words):
        try:
            callback()
        except Exception as exc:  # the exit must happen whatever a callback does
            print(f"clip-tao: while exiting: {exc!r}", file=sys.stderr, flush=True)
    for child in multiprocessing.active_children():
        child.terminate()
    os._exit(128 + (_requested or _arrived))

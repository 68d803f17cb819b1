"""Exclusive claims on an output (a run's folder, an export's files) for as long as a process writes it.

Two runs writing one folder interleave checkpoints and status lines; two exports to one file mix their files.
The claim is an advisory POSIX lock (``lockf``) on a small lock file that names its holder: the kernel
releases it when the holder exits, however it exits, so a crash never leaves a stale claim behind. Unlike
``flock``, a POSIX lock is not shared with forked children: DataLoader workers that outlive a killed run for a
moment do not keep its folder claimed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator

from clip_tao import stopping
from clip_tao.errors import OutputError


@contextlib.contextmanager
def exclusive_claim(lock_path: str, what: str) -> Iterator[None]:
    """Hold ``lock_path`` exclusively for the block; :class:`OutputError` naming the holder if another has it.

    ``what`` names the claimed thing in the error (``results_dir/train``). The lock file is removed on release.
    """
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputError(
                f"{what} is in use by {_holder(lock_path)}: wait for it to finish, stop it, "
                "or write to another folder/file"
            ) from None
        # The previous holder may have removed the file between our open and our lock: then we locked an
        # orphan that nobody else will see; start again on the file that is there now.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        with stopping.last_words(lambda: os.remove(lock_path)):  # a process ended from outside the main thread
            yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path)  # while still locked: a waiter then retries on a fresh file
        os.close(fd)


def _holder(lock_path: str) -> str:
    """``process 1234 on host`` from the lock file, or a neutral phrase when it is unreadable."""
    try:
        with open(lock_path, encoding="utf-8") as f:
            pid, _, host = f.read().strip().partition(" ")
    except OSError:
        return "another process"
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" on {host}" if host else "")

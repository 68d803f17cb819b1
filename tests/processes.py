"""Process trees from /proc, for tests that kill a whole run at once as a preempted node loses it.

torchrun starts each rank in a session of its own, so killing torchrun's process group would leave the
ranks (and their loader workers) running: the tree is walked by parent pid instead.
"""

from __future__ import annotations

import contextlib
import os
import signal


def children() -> dict[int, list[int]]:
    """Parent pid -> child pids."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # the process ended meanwhile
                continue
            found.setdefault(parent, []).append(int(entry))
    return found


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it, parents before their children."""
    below = children()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += below.get(pid, [])
    return tree


def kill_tree(*roots: int) -> None:
    """SIGKILL every process of the trees at once: the launchers first (so they restart nothing), then every
    rank and worker."""
    for pid in [pid for root in roots for pid in process_tree(root)]:
        with contextlib.suppress(ProcessLookupError):  # a worker that ended meanwhile
            os.kill(pid, signal.SIGKILL)

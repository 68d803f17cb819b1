"""A recursive folder scan that follows symbolic links but reads every real folder once.

``os.walk(followlinks=True)`` re-enters a folder each time a link leads back to it, so a link to a parent
turns four images into hundreds. Here a folder already seen (same device and inode) is skipped and logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)


def walk_files_once(top: str) -> Iterator[str]:
    """Paths relative to ``top`` of every file below it, sorted, each real folder visited once."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(top, followlinks=True):
        st = os.stat(root)
        identity = (st.st_dev, st.st_ino)
        if identity in seen:  # reached again through a link: os.walk would descend into it once more
            log.warning("%s: skipped, a symbolic link to a folder already scanned", root)
            dirs[:] = []
            continue
        seen.add(identity)
        kept = []
        for name in sorted(dirs):
            path = os.path.join(root, name)
            try:
                sub = os.stat(path)
            except OSError:  # a dangling link
                continue
            if (sub.st_dev, sub.st_ino) in seen:
                log.warning("%s: skipped, a symbolic-link loop back to a folder already scanned", path)
                continue
            kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            yield os.path.relpath(os.path.join(root, name), top)

"""The download command to name in messages: the one the installed ``huggingface_hub`` provides.

``huggingface_hub`` 1.0 replaced ``huggingface-cli`` by ``hf``; telling a user to run a command their
installation lacks sends them searching, so the name is read from the installed package's entry points.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from importlib import metadata
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


@functools.cache
def hub_cli() -> str:
    """``hf`` or ``huggingface-cli``: the console script the installed ``huggingface_hub`` declares."""
    try:
        scripts = {
            e.name for e in metadata.distribution("huggingface_hub").entry_points if e.group == "console_scripts"
        }
    except metadata.PackageNotFoundError:
        scripts = set()
    return "huggingface-cli" if "huggingface-cli" in scripts and "hf" not in scripts else "hf"


def download_command(repo: str, *files: str) -> str:
    """``hf download <repo> [files]`` for the installed version (``huggingface-cli download`` on old ones)."""
    return " ".join([hub_cli(), "download", repo, *files])


_checked = False


def prepare_hub(timeout_s: float = 3.0) -> None:
    """Before a hub download: when the hub cannot be reached, switch ``huggingface_hub`` to offline mode.

    Otherwise each file is retried with back-off (half a minute of repeated log lines) before the error that
    says what to download. Offline, the local cache answers at once and the error comes first. Checked once a
    process; nothing happens when ``HF_HUB_OFFLINE=1`` is already set.
    """
    global _checked
    if _checked:
        return
    _checked = True
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    port = urlsplit(constants.ENDPOINT).port or 443
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
        os.environ["HF_HUB_OFFLINE"] = "1"  # and by any process started from here
        log.warning("%s cannot be reached (%s): using the local Hugging Face cache only", host, exc.strerror or exc)

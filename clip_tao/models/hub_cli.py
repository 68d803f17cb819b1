"""The download command to name in messages: the one the installed ``huggingface_hub`` provides.

``huggingface_hub`` 1.0 replaced ``huggingface-cli`` by ``hf``; telling a user to run a command their
installation lacks sends them searching, so the name is read from the installed package's entry points.
"""

from __future__ import annotations

import functools
from importlib import metadata


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

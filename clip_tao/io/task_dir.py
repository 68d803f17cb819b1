"""The folder a task writes to: ``results_dir/<task>/`` with ``experiment.yaml`` and ``status.json``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from clip_tao.config.loader import config_to_dict
from clip_tao.config.schema import ExperimentConfig
from clip_tao.io.atomic import clean_stale_temp_files, write_yaml
from clip_tao.io.locks import exclusive_claim
from clip_tao.io.status import StatusWriter

log = logging.getLogger(__name__)
LOCK_NAME = ".clip-tao.lock"


def prepare_task_dir(cfg: ExperimentConfig, task: str) -> tuple[str, StatusWriter]:
    """Create the task folder, write the resolved spec to ``experiment.yaml``; return it and its status log."""
    out_dir = cfg.task_dir(task)
    os.makedirs(out_dir, exist_ok=True)
    write_yaml(os.path.join(out_dir, "experiment.yaml"), config_to_dict(cfg))
    return out_dir, StatusWriter(out_dir)


@contextlib.contextmanager
def claim_task_dir(folder: str, task: str) -> Iterator[None]:
    """Hold ``folder`` for this run (another run into it fails at once, naming this process);
    temporary files that a killed run left there are removed first."""
    with exclusive_claim(os.path.join(folder, LOCK_NAME), f"{folder} ({task})"):
        removed = clean_stale_temp_files(folder)
        if removed:
            log.info("%s: removed %d temporary file(s) of an interrupted run", folder, len(removed))
        yield


def failure_message(what: str, exc: BaseException) -> str:
    """The status.json message of a task that stopped: interrupted by a signal, or failed."""
    if isinstance(exc, KeyboardInterrupt):
        return f"{what} interrupted ({exc.args[0] if exc.args else 'SIGINT'})."
    return f"{what} failed: {exc}"

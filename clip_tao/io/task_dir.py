"""The folder a task writes to: ``results_dir/<task>/`` with ``experiment.yaml`` and ``status.json``."""

from __future__ import annotations

import os

from clip_tao.config.loader import config_to_dict
from clip_tao.config.schema import ExperimentConfig
from clip_tao.io.atomic import write_yaml
from clip_tao.io.status import StatusWriter


def prepare_task_dir(cfg: ExperimentConfig, task: str) -> tuple[str, StatusWriter]:
    """Create the task folder, write the resolved spec to ``experiment.yaml``; return it and its status log."""
    out_dir = cfg.task_dir(task)
    os.makedirs(out_dir, exist_ok=True)
    write_yaml(os.path.join(out_dir, "experiment.yaml"), config_to_dict(cfg))
    return out_dir, StatusWriter(out_dir)

"""TAO 7.3's ``train.checkpointer``: keep the best checkpoints by a monitored KPI, beside the periodic ones.

After every validation the monitored figure decides whether this epoch's weights join the ``save_top_k`` best;
the file is named by ``filename`` (Lightning's format fields: ``{epoch:03d}``, ``{step}``, any KPI such as
``{val/t2i_mAP:.4f}``), ``.pth`` added (``.dcp`` for the sharded checkpoint folders of FSDP), in ``dirpath`` (default: the train results folder). A checkpoint that falls
out of the best is deleted. ``replace_periodic`` keeps a single best file and no periodic series.

``monitor`` is any KPI name of the epoch: TAO's (``val/t2i_mAP``, fractions; ``val/pas/overall_mAP``) or clip-tao's
(``t2i_mAP``, percent). Null watches ``val/t2i_mAP``, or ``val/pas/overall_mAP`` under metadata validation (TAO's own
fallback, ``val_loss``, is a name CLIP never logs). A null ``mode`` is ``min`` for losses, drift and rank figures (MedR, MeanR) and ``max`` otherwise, where TAO
falls back to ``min`` whatever the figure. A monitored name missing after a validation is one error listing
the names there are, as TAO's guard does.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

from clip_tao.config.schema import CheckpointerConfig
from clip_tao.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MONITOR = "val/t2i_mAP"
_LOWER_IS_BETTER = ("loss", "drift", "medr", "meanr")
_FIELD = re.compile(r"\{([^{}:]+)(:[^{}]*)?\}")


def default_mode(monitor: str) -> str:
    return "min" if any(word in monitor.lower() for word in _LOWER_IS_BETTER) else "max"


class TopKCheckpoints:
    """Which checkpoint files are the best so far; the trainer writes and deletes what :meth:`offer` says."""

    def __init__(self, cfg: CheckpointerConfig, out_dir: str, default_monitor: str | None = None, suffix: str = ".pth"):
        self.monitor = cfg.monitor or default_monitor or DEFAULT_MONITOR
        self.mode = cfg.mode or default_mode(self.monitor)
        self.keep = 1 if cfg.replace_periodic else cfg.save_top_k
        self.dirpath = cfg.dirpath or out_dir
        self.pattern = cfg.filename
        self.suffix = suffix
        self.insert_names = cfg.auto_insert_metric_name
        self.kept: list[dict[str, Any]] = []  # {"value", "path", "epoch"}, best first
        if not cfg.monitor or not cfg.mode:
            log.info("train.checkpointer keeps the %d best by %s (%s)", self.keep, self.monitor, self.mode)

    def value(self, figures: dict[str, Any]) -> float:
        """The monitored figure of an epoch's KPIs (TAO's are strings: converted)."""
        if self.monitor not in figures:
            names = ", ".join(sorted(k for k, v in figures.items() if _number(v) is not None))
            raise ConfigError(
                f"train.checkpointer.monitor={self.monitor} is not among this validation's figures: {names}"
            )
        value = _number(figures[self.monitor])
        if value is None:
            raise ConfigError(f"train.checkpointer.monitor={self.monitor} is {figures[self.monitor]!r}, not a number")
        return value

    def filename(self, figures: dict[str, Any]) -> str:
        """``filename`` with its format fields filled, ``/`` in names written ``_``, the suffix (``.pth``) appended."""

        def fill(match: re.Match) -> str:
            name, spec = match.group(1), (match.group(2) or "")[1:]
            if name not in figures:
                raise ConfigError(
                    f"train.checkpointer.filename={self.pattern!r}: no figure {name!r} "
                    f"(there are epoch, step and {', '.join(sorted(k for k in figures if '/' in k)[:6])} ...)"
                )
            value = figures[name]
            if isinstance(value, str) and spec and _number(value) is not None:
                value = float(value)  # TAO's KPIs are strings in status.json
            text = format(value, spec)
            return f"{name}_{text}" if self.insert_names else text

        name = _FIELD.sub(fill, self.pattern).replace("/", "_")
        return os.path.join(self.dirpath, name.removesuffix(".pth").removesuffix(self.suffix) + self.suffix)

    def offer(self, value: float, epoch: int, figures: dict[str, Any]) -> tuple[str | None, list[str]]:
        """``(path to write this epoch's weights to or None, paths to delete)``."""
        if math.isnan(value):
            log.warning("train.checkpointer: %s is NaN at epoch %d: not ranked", self.monitor, epoch)
            return None, []
        better = (lambda a, b: a > b) if self.mode == "max" else (lambda a, b: a < b)
        if len(self.kept) >= self.keep and not better(value, self.kept[-1]["value"]):
            return None, []
        path = self.filename(figures)
        entries = [e for e in self.kept if e["path"] != path]  # a repeated name is overwritten
        entries.append({"value": value, "path": path, "epoch": epoch})
        entries.sort(key=lambda e: e["value"], reverse=self.mode == "max")
        self.kept, dropped = entries[: self.keep], entries[self.keep :]
        return path, [e["path"] for e in dropped if e["path"] != path]

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "kept": list(self.kept)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and state.get("monitor") == self.monitor and state.get("mode") == self.mode:
            self.kept = list(state.get("kept", []))[: self.keep]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None

"""The figures of ``status.json`` under the names, scales and types TAO 7.0.1 writes them.

TAO's remote service and its AutoML read these. Retrieval KPIs are ``<prefix>/<i2t|t2i>_<mAP|R@1|MedR|AUC>``
(``val/`` during training, ``test/`` in evaluate) with fractions in [0, 1] (ranks as ranks), written as
strings; each epoch line carries ``epoch``, ``step``, ``max_epoch`` (the last epoch's index), ``max_step``,
``time_per_epoch``, ``time_per_step`` and ``eta`` (``H:MM:SS.ffffff``, Python's ``timedelta``).
clip-tao's own figures (percentages, ``train_loss`` ...) stay beside them under their own names.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

# Our metric name -> (TAO's suffix, divisor to TAO's scale)
_RETRIEVAL = {"mAP": ("mAP", 100.0), "R@1": ("R@1", 100.0), "MedR": ("MedR", 1.0), "AUC": ("AUC", 1.0)}


def tao_retrieval_kpi(metrics: dict[str, Any], prefix: str) -> dict[str, str]:
    """``{"val/t2i_mAP": "0.4312", ...}`` from our ``{"t2i_mAP": 43.12, ...}`` (percent)."""
    out = {}
    for direction in ("i2t", "t2i"):
        for ours, (theirs, divisor) in _RETRIEVAL.items():
            value = metrics.get(f"{direction}_{ours}")
            if isinstance(value, (int, float)):
                out[f"{prefix}/{direction}_{theirs}"] = str(float(value) / divisor)
    return out


def tao_epoch_fields(
    epoch: int, num_epochs: int, step: int, steps_per_epoch: int, epoch_seconds: float, step_seconds: float
) -> dict[str, Any]:
    """TAO's per-epoch progress fields (its status callback's, at an epoch's end)."""
    return {
        "epoch": epoch,
        "step": step,
        "max_epoch": num_epochs - 1,
        "max_step": num_epochs * steps_per_epoch,
        "time_per_epoch": str(timedelta(seconds=epoch_seconds)),
        "time_per_step": str(timedelta(seconds=step_seconds)),
        "eta": str(timedelta(seconds=(num_epochs - 1 - epoch) * epoch_seconds)),
    }

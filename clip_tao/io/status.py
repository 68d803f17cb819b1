"""``status.json``: TAO's JSON-lines progress log, one object a line, read by TAO's tools and dashboards."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from clip_tao.io.atomic import json_safe


class StatusWriter:
    """Appends TAO-style status lines (``date``, ``time``, ``status``, ``message``, ``kpi`` ...)."""

    def __init__(self, folder: str, enabled: bool = True):
        self.path = os.path.join(folder, "status.json")
        self.enabled = enabled
        if enabled:
            os.makedirs(folder, exist_ok=True)

    def write(self, status: str, message: str, kpi: dict[str, Any] | None = None, **fields: Any) -> None:
        """``status``: STARTED, RUNNING, SUCCESS, FAILURE or SKIPPED (TAO's values)."""
        if not self.enabled:
            return
        now = datetime.now()
        line: dict[str, Any] = {
            "date": f"{now.month}/{now.day}/{now.year}",
            "time": now.strftime("%H:%M:%S"),
            "status": status,
            "verbosity": "INFO",
            "message": message,
            **fields,
        }
        if kpi is not None:
            line["kpi"] = {k: _plain(v) for k, v in kpi.items()}
        # One short line per write: appending is atomic enough for a log that readers tail.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(line), allow_nan=False) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value

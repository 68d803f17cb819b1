"""status.json as TAO 7.0.1 writes it (the keys from ``tests/data/tao_7.0.1_status.json``, taken from TAO's code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from clip_tao.cli import main

TAO = json.loads((Path(__file__).parent / "data" / "tao_7.0.1_status.json").read_text())
# str(timedelta): "0:00:01.234567" (or "1 day, 2:03:04")
TIMEDELTA = re.compile(r"^(\d+ days?, )?\d+:\d\d:\d\d(\.\d{6})?$")
FRACTIONS = ("mAP", "R@1", "AUC")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_retrieval_kpi(kpi: dict, keys: list[str], ours: dict) -> None:
    assert set(keys) <= set(kpi)
    for key in keys:
        value = kpi[key]
        assert isinstance(value, str)
        prefix, name = key.split("/")
        direction, figure = name.split("_", 1)
        if figure in FRACTIONS:
            assert 0.0 <= float(value) <= 1.0
        # Our own figure of the same name (percent for R@1 and mAP) is the same measurement.
        scale = 100.0 if figure in ("mAP", "R@1") else 1.0
        assert abs(float(value) * scale - ours[f"{direction}_{figure}"]) < 1e-9


def test_training_and_evaluation_status_as_tao_writes_it(tiny_spec, tmp_path):
    spec = tiny_spec("tiny-clip")
    assert main(["train", "-e", str(spec), "wandb.enable=false"]) == 0
    lines = _lines(tmp_path / "results" / "train" / "status.json")
    assert all(set(TAO["line_keys"]) <= set(line) for line in lines)
    epochs = [line for line in lines if line["status"] == "RUNNING"]
    assert [e["epoch"] for e in epochs] == [0, 1] and [e["step"] for e in epochs] == [3, 6]
    for line in epochs:
        assert set(TAO["epoch_keys"]) <= set(line)
        assert line["max_epoch"] == 1 and line["max_step"] == 6  # TAO: max_epochs - 1; epochs x steps
        for key in ("time_per_epoch", "time_per_step", "eta"):
            assert TIMEDELTA.match(line[key]), line[key]
        _check_retrieval_kpi(line["kpi"], TAO["validation_kpi"], line["kpi"])
    assert epochs[-1]["eta"].startswith("0:00:00")  # nothing left after the last epoch

    checkpoint = tmp_path / "results" / "train" / "clip_latest.pth"
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={checkpoint}"]) == 0
    final = _lines(tmp_path / "results" / "evaluate" / "status.json")[-1]
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    assert final["status"] == "SUCCESS"
    _check_retrieval_kpi(final["kpi"], TAO["test_kpi"], results)
    assert "t2i_R@1" in results and not any("/" in key for key in results)  # results.json keeps our format

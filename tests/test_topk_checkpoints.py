"""TAO 7.3's ``train.checkpointer``: the best checkpoints by any monitored KPI, beside clip_best.pth."""

from __future__ import annotations

import json

import pytest

from clip_tao.cli import main
from clip_tao.config.schema import CheckpointerConfig
from clip_tao.engine.topk import TopKCheckpoints
from clip_tao.errors import ConfigError


def _overrides(section: dict) -> list[str]:
    quoted = {k: (f"'{v}'" if isinstance(v, str) else json.dumps(v)) for k, v in section.items()}
    return [f"train.checkpointer.{k}={v}" for k, v in quoted.items()]


def _epoch_lines(train_dir):
    lines = [json.loads(line) for line in (train_dir / "status.json").read_text().splitlines()]
    return [line for line in lines if line.get("status") == "RUNNING"]


def test_topk_keeps_the_best_by_a_tao_kpi_name(tiny_spec, tmp_path):
    spec = tiny_spec("tiny-clip", num_train=16, num_val=8, train={"num_epochs": 3, "optim": {"warmup_steps": 1}})
    checkpointer = {
        "enable_topk": True,
        "monitor": "val/t2i_mAP",
        "mode": "max",
        "save_top_k": 2,
        "filename": "best_{epoch:03d}_{val/t2i_mAP:.4f}",
        "dirpath": str(tmp_path / "best"),
    }
    args = ["train", "-e", str(spec), "wandb.enable=false", "dataset.train.batch_size=8"]
    assert main([*args, *_overrides(checkpointer)]) == 0
    train = tmp_path / "results" / "train"
    epochs = _epoch_lines(train)
    values = [(float(line["kpi"]["val/t2i_mAP"]), line["epoch"]) for line in epochs]
    assert len(values) == 3
    # The two best epochs (a tie goes to the earlier one, which came first), by TAO's value, named by it.
    best = sorted(values, key=lambda v: -v[0])[:2]
    want = {f"best_{epoch:03d}_{value:.4f}.pth" for value, epoch in best}
    assert {p.name for p in (tmp_path / "best").iterdir()} == want
    assert (train / "clip_best.pth").is_file()  # ours stays
    assert len(list(train.glob("model_epoch_*.pth"))) == 3  # additive to the periodic ones


def test_replace_periodic_keeps_one_file_and_a_lower_is_better_kpi(tiny_spec, tmp_path):
    spec = tiny_spec("tiny-clip", num_train=16, num_val=8, train={"num_epochs": 3, "optim": {"warmup_steps": 1}})
    checkpointer = {"enable_topk": True, "replace_periodic": True, "monitor": "train_loss", "save_top_k": 3}
    args = ["train", "-e", str(spec), "wandb.enable=false", "dataset.train.batch_size=8"]
    assert main([*args, *_overrides(checkpointer)]) == 0
    train = tmp_path / "results" / "train"
    losses = [(line["kpi"]["train_loss"], line["epoch"]) for line in _epoch_lines(train)]
    best_epoch = min(losses)[1]  # mode null: a loss is lower-is-better
    assert sorted(p.name for p in train.glob("model_best_*.pth")) == [f"model_best_{best_epoch:03d}.pth"]
    assert [p.name for p in train.glob("model_epoch_*.pth")] == ["model_epoch_002_step_00006.pth"]
    assert (train / "clip_latest.pth").is_file()


def test_a_monitor_that_is_not_logged_is_one_line(tiny_spec, tmp_path, capsys):
    spec = tiny_spec("tiny-clip", num_train=16, num_val=8, train={"num_epochs": 1})
    args = ["train", "-e", str(spec), "wandb.enable=false", "dataset.train.batch_size=8"]
    capsys.readouterr()
    assert main([*args, "train.checkpointer.enable_topk=true", "train.checkpointer.monitor=val_loss"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bars
    assert len(err) == 1
    err = err[0]
    assert "train.checkpointer.monitor=val_loss is not among this validation's figures" in err
    assert "val/t2i_mAP" in err and "t2i_mAP" in err


def test_ranking_rules():
    topk = TopKCheckpoints(CheckpointerConfig(enable_topk=True, save_top_k=2, filename="m_{epoch}"), "/out")
    assert (topk.monitor, topk.mode) == ("val/t2i_mAP", "max")
    assert topk.offer(0.5, 0, {"epoch": 0}) == ("/out/m_0.pth", [])
    assert topk.offer(0.7, 1, {"epoch": 1}) == ("/out/m_1.pth", [])
    assert topk.offer(0.4, 2, {"epoch": 2}) == (None, [])  # worse than both kept
    assert topk.offer(0.6, 3, {"epoch": 3}) == ("/out/m_3.pth", ["/out/m_0.pth"])
    assert topk.offer(float("nan"), 4, {"epoch": 4}) == (None, [])
    assert [e["epoch"] for e in topk.kept] == [1, 3]
    named = TopKCheckpoints(CheckpointerConfig(filename="x_{epoch:02d}", auto_insert_metric_name=True), "/o")
    assert named.filename({"epoch": 7}) == "/o/x_epoch_07.pth"
    assert TopKCheckpoints(CheckpointerConfig(monitor="val/t2i_MedR"), "/o").mode == "min"
    with pytest.raises(ConfigError, match="no figure 'val/pas/overall_mAP'"):
        TopKCheckpoints(CheckpointerConfig(filename="b_{val/pas/overall_mAP:.3f}"), "/o").filename({"epoch": 1})

"""Secrets never reach a file or a log: spec interpolations of the environment, URLs with credentials."""

from __future__ import annotations

import yaml

from clip_tao.cli import main
from clip_tao.config import load_experiment

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def _all_bytes(folder) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_environment_interpolations_are_written_as_expressions(tiny_spec, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    spec = tiny_spec(
        num_train=32,
        train={"num_epochs": 1, "precision": "fp32"},
        wandb={"entity": "${oc.env:AWS_SECRET_ACCESS_KEY}", "name": "${wandb.entity}"},
        encryption_key="tlt_encode_in_clear",
    )
    cfg = load_experiment(spec)
    assert cfg.wandb.entity == cfg.wandb.name == SECRET  # the run itself sees the value

    assert main(["train", "-e", str(spec)]) == 0
    train = tmp_path / "results" / "train"
    checkpoint = train / "clip_latest.pth"
    assert main(["export", "-e", str(spec), f"export.checkpoint={checkpoint}",
                 f"export.onnx_file={tmp_path / 'out' / 'clip.onnx'}"]) == 0  # fmt: skip

    for folder in (tmp_path / "results", tmp_path / "out"):
        written = _all_bytes(folder)
        assert SECRET.encode() not in written and b"tlt_encode_in_clear" not in written
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + caplog.text
    experiment = yaml.safe_load((train / "experiment.yaml").read_text())
    assert experiment["wandb"]["entity"] == "${oc.env:AWS_SECRET_ACCESS_KEY}"
    assert experiment["wandb"]["name"] == "${wandb.entity}"
    assert experiment["encryption_key"] == "***"
    exported = yaml.safe_load((tmp_path / "out" / "clip_config.yaml").read_text())
    assert exported["wandb"]["entity"] == "${oc.env:AWS_SECRET_ACCESS_KEY}"
    assert experiment["dataset"]["train"]["datasets"][0]["image_dir"] == str(tmp_path / "data" / "train")


def test_an_override_that_reads_the_environment_is_kept_as_written(tiny_spec, monkeypatch):
    from clip_tao.config.loader import config_to_dict

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    cfg = load_experiment(tiny_spec(), ["wandb.project=${oc.env:AWS_SECRET_ACCESS_KEY}"])
    assert cfg.wandb.project == SECRET
    written = config_to_dict(cfg)
    assert written["wandb"]["project"] == "${oc.env:AWS_SECRET_ACCESS_KEY}"
    assert SECRET not in yaml.safe_dump(written)

"""Secrets never reach a file or a log: spec interpolations of the environment, URLs with credentials."""

from __future__ import annotations

import pytest
import yaml

from clip_tao.cli import main
from clip_tao.config import load_experiment
from tests.test_s3 import SECRET as S3_SECRET
from tests.test_s3 import s3_server  # noqa: F401 (the local S3 server fixture)

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
    cfg = load_experiment(tiny_spec(), ["wandb.project=${oc.env:AWS_SECRET_ACCESS_KEY}", "model.tokenizer_path=/tok"])
    assert cfg.wandb.project == SECRET
    written = config_to_dict(cfg)
    assert written["wandb"]["project"] == "${oc.env:AWS_SECRET_ACCESS_KEY}"
    assert written["model"]["tokenizer_path"] == "/tok"  # a key that merely contains "token" is not masked
    assert SECRET not in yaml.safe_dump(written)


@pytest.mark.parametrize(
    "line",
    [
        # credentials in the endpoint's user part
        "s3://clip-data/train/shard-000000.tar?endpoint=http://testing:{secret}@127.0.0.1:{port}&region=us-east-1",
        # an unbalanced brace on a line whose query carries a secret
        "s3://clip-data/train/shard-{{000000..000003.tar?endpoint=http://127.0.0.1:{port}&aws_secret_access_key={secret}",
    ],
)
def test_a_shard_list_with_credentials_never_echoes_them(s3_server, tiny_spec, tmp_path, capsys, caplog, line):  # noqa: F811
    port = s3_server["query"].split("127.0.0.1:", 1)[1].split("&", 1)[0]
    listing = tmp_path / "shards.txt"
    listing.write_text(line.format(secret=S3_SECRET, port=port) + "\n")
    spec = tiny_spec(num_train=8)
    wds = f"dataset.train={{type: wds, batch_size: 4, num_workers: 0, wds: {{shard_list_file: {listing}}}}}"
    assert main(["train", "-e", str(spec), wds]) == 1
    out = capsys.readouterr()
    error = [part for part in out.err.splitlines() if part.startswith("clip-tao ")]
    assert len(error) == 1 and "shards.txt" in error[0]
    assert "credentials do not belong in URLs" in error[0] or "unbalanced braces" in error[0]
    status = (tmp_path / "results" / "train" / "status.json").read_text()
    assert '"FAILURE"' in status
    for text in (out.out, out.err, caplog.text, status):
        assert S3_SECRET not in text

"""wandb logging with TAO's keys; ``WANDB_MODE=offline`` (no network) is how it runs here."""

from __future__ import annotations

import logging
import struct
import sys

from clip_tao.cli import main


def _records(path):
    """The protobuf records of a run's ``.wandb`` file: wandb's 7-byte header, then LevelDB-log records
    (32 KiB blocks; crc32, length, type = full/first/middle/last), each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_offline_run_gets_the_training_scalars(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = tiny_spec("tiny-clip", wandb={"enable": True, "project": "clip-tests", "name": "tiny", "tags": ["t"]})
    assert main(["train", "-e", str(spec), "train.num_epochs=1", "encryption_key=secret-value"]) == 0
    runs = list((tmp_path / "results" / "train" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(_records(next(runs[0].glob("run-*.wandb"))))
    history = [item for r in records if r.HasField("history") for item in r.history.item]
    logged = {item.key or "/".join(item.nested_key) for item in history}
    assert {"epoch/train_loss", "epoch/t2i_mAP", "train/loss"} <= logged
    run = next(r.run for r in records if r.HasField("run"))
    updates = [*run.config.update, *(i for r in records if r.HasField("config") for i in r.config.update)]
    config = {item.key or "/".join(item.nested_key): item.value_json for item in updates}
    assert "tiny-clip" in config["model"] and "encryption_key" not in config  # the spec, without secrets
    assert run.project == "clip-tests" and run.display_name.startswith("tiny_") and list(run.tags) == ["t"]


def test_enabled_without_login_warns_once_and_trains(tiny_spec, tmp_path, monkeypatch, caplog):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    spec = tiny_spec("tiny-clip")  # TAO's default: wandb.enable=true
    with caplog.at_level(logging.WARNING):
        assert main(["train", "-e", str(spec), "train.num_epochs=1"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "not logged in" in warnings[0]
    assert not (tmp_path / "results" / "train" / "wandb").exists()


def test_enabled_without_the_package_warns_once_and_trains(tiny_spec, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")  # usable, were it installed
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: import fails
    spec = tiny_spec("tiny-clip")
    with caplog.at_level(logging.WARNING):
        assert main(["train", "-e", str(spec), "train.num_epochs=1"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "not installed" in warnings[0]

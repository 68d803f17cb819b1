"""Outputs are safe: one writer a folder or file, final status on signals, no folder deleted, a full disk is
one line, and files get the mode the umask asks for."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from clip_tao.deploy.onnx_export import export_onnx
from clip_tao.engine.checkpoint import save_checkpoint
from clip_tao.errors import DataError
from clip_tao.io.atomic import write_json
from clip_tao.models import create_model
from tests.conftest import REPO

_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_leftover_processes():
    """A failing test must not leave a 1000-epoch training behind."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


def _cli(*argv: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "clip_tao", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs,
    )  # fmt: skip
    _STARTED.append(process)
    return process


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _status(folder) -> list[dict]:
    path = folder / "status.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _error_line(stderr: str) -> str:
    (line,) = [part for part in stderr.replace("\r", "\n").splitlines() if part.startswith("clip-tao ")]
    return line


def test_a_second_training_into_the_same_folder_is_refused_and_a_signal_writes_a_final_status(tiny_spec, tmp_path):
    spec = tiny_spec(num_train=32, train={"num_epochs": 1000, "precision": "fp32"})
    train = tmp_path / "results" / "train"
    train.mkdir(parents=True)
    stale = train / ".clip_latest.pth.k3j4h5.tmp"  # what a run killed mid-save leaves
    stale.write_bytes(b"half a checkpoint")

    first = _cli("train", "-e", str(spec))
    _wait_for(lambda: any(line["status"] == "RUNNING" for line in _status(train)), "the first epoch", first)
    assert not stale.exists()

    second = _cli("train", "-e", str(spec))
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1
    assert f"in use by process {first.pid}" in _error_line(err)

    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "interrupted (SIGINT)" in _error_line(err)
    last = _status(train)[-1]
    assert last["status"] == "FAILURE" and "interrupted (SIGINT)" in last["message"]
    assert not list(train.glob(".*.tmp")) and not (train / ".clip-tao.lock").exists()


def test_sigterm_writes_a_final_status(tiny_spec, tmp_path):
    spec = tiny_spec(num_train=32, train={"num_epochs": 1000, "precision": "fp32"})
    train = tmp_path / "results" / "train"
    run = _cli("train", "-e", str(spec))
    _wait_for(lambda: any(line["status"] == "STARTED" for line in _status(train)), "the start", run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143 and "interrupted (SIGTERM)" in _error_line(err)
    assert _status(train)[-1]["status"] == "FAILURE"


def test_two_exports_to_one_file_the_second_fails_cleanly(tiny_spec, tmp_path):
    spec = tiny_spec()
    onnx_file = tmp_path / "export" / "clip.onnx"
    first = _cli("export", "-e", str(spec), f"export.onnx_file={onnx_file}")
    lock = tmp_path / "export" / ".clip.export.lock"
    _wait_for(lock.exists, "the first export's claim", first)
    second = _cli("export", "-e", str(spec), f"export.onnx_file={onnx_file}", "export.overwrite=true")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1 and f"in use by process {first.pid}" in _error_line(err)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert sorted(p.name for p in onnx_file.parent.iterdir()) == ["clip.onnx", "clip_config.yaml", "clip_tokenizer"]


def test_overwrite_never_deletes_a_folder_the_user_named(tmp_path):
    model = create_model("tiny-clip", pretrained=False)
    folder = tmp_path / "models.onnx"  # a folder that happens to carry the name
    (folder / "keep").mkdir(parents=True)
    (folder / "keep" / "weights.bin").write_bytes(b"precious")
    with pytest.raises(DataError, match="models.onnx is a folder"):
        export_onnx(model, str(folder), overwrite=True)
    assert (folder / "keep" / "weights.bin").read_bytes() == b"precious"

    tokenizer = tmp_path / "clip_tokenizer"  # not written by export
    tokenizer.mkdir()
    (tokenizer / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a tokenizer folder written by export"):
        export_onnx(model, str(tmp_path / "clip.onnx"), overwrite=True)
    assert (tokenizer / "notes.txt").read_text() == "mine"


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tiny_spec, tmp_path):
    spec = tiny_spec(num_train=32, train={"num_epochs": 1, "precision": "fp32"})
    run = _cli("train", "-e", str(spec), preexec_fn=_limit_file_size)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 1 and "Traceback" not in err
    line = _error_line(err)
    assert "cannot write" in line and "model_epoch_000_step_00002.pth" in line and "free some space" in line
    train = tmp_path / "results" / "train"
    assert not list(train.glob("*.pth")) and not list(train.glob(".*.tmp"))
    assert _status(train)[-1]["status"] == "FAILURE"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "results.json", {"a": 1})
        save_checkpoint(str(tmp_path / "model.pth"), {"model": {"w": torch.zeros(2)}})
        with open(tmp_path / "plain.txt", "w") as f:  # what open() gives, as status.json is written
            f.write("x")
    finally:
        os.umask(old)
    want = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert want == 0o666 & ~umask
    for name in ("results.json", "model.pth"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == want, name

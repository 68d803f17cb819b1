"""Exact resumption end to end: the keys trained on at every step, and the weights, match an uninterrupted run."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from clip_tao.cli import main
from tests.shards import write_shardwriter


def _wds_sections(tmp_path, workers=2):
    write_shardwriter(tmp_path / "shards", 48, per_shard=8)  # 6 shards
    return {
        "type": "wds",
        "batch_size": 8,
        "num_workers": workers,
        "wds": {"root_dir": str(tmp_path / "shards"), "samples_per_shard": 8},
    }


def _spec(tiny_spec, tmp_path, kind, **train):
    """tiny_spec's data with 2 loader workers; for ``wds`` the same kind of data as shards."""
    import yaml

    spec = tiny_spec(train={"num_epochs": 2, "checkpoint_interval_unit": "step", "checkpoint_interval": 2, **train})
    data = yaml.safe_load(spec.read_text())
    data["dataset"]["train"]["num_workers"] = 2
    if kind == "wds":
        data["dataset"]["train"] = _wds_sections(tmp_path)
    spec.write_text(yaml.safe_dump(data))
    return spec


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _assert_same_weights(a, b):
    a, b = _weights(a), _weights(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["custom", "wds"])
def test_resumed_run_trains_on_exactly_the_same_samples(tiny_spec, tmp_path, kind):
    # wds: 6 steps an epoch from 2 workers; a checkpoint after 3 (an odd step) resumes in the middle
    spec = _spec(tiny_spec, tmp_path, kind, checkpoint_interval=3 if kind == "wds" else 2)
    straight_log = tmp_path / "straight.keys"
    assert main(["train", "-e", str(spec), f"train.sample_log={straight_log}"]) == 0
    straight = tmp_path / "results" / "train"
    checkpoints = sorted(straight.glob("model_epoch_*_step_*.pth"))
    # the first checkpoint: in the middle of the first epoch
    middle = checkpoints[0]
    saved = torch.load(middle, weights_only=True)
    step = saved["global_step"]
    assert 0 < saved["batches_in_epoch"] < (6 if kind == "wds" else 3) and saved["epoch"] == 0
    if kind == "wds":  # 6 shards, global batch 8: 4 sample streams, 2 for each loader worker
        assert saved["batches_in_epoch"] == 3 and saved["data_position"]["layout"]["streams"] == 4
        assert sorted(saved["data_position"]["streams"]) == ["0", "1", "2", "3"]  # a position per stream
    # The log of the interrupted run: everything up to the kill (a few steps past the checkpoint).
    lines = straight_log.read_text().splitlines()
    assert lines and len({line.split()[1] for line in lines}) > 8
    resumed_log = tmp_path / "resumed.keys"
    resumed_log.write_text("\n".join(lines[: len(lines) * 3 // 4]) + "\n")
    resumed = tmp_path / "resumed"
    args = [f"results_dir={resumed}", f"train.resume_training_checkpoint_path={middle}",
            f"train.sample_log={resumed_log}"]  # fmt: skip
    assert main(["train", "-e", str(spec), *args]) == 0
    assert resumed_log.read_text() == straight_log.read_text()
    assert step > 0
    _assert_same_weights(straight / "clip_latest.pth", resumed / "train" / "clip_latest.pth")


def test_a_killed_process_resumes_exactly(tiny_spec, tmp_path):
    spec = _spec(tiny_spec, tmp_path, "wds", num_epochs=6, checkpoint_interval=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    ref_log = tmp_path / "reference.keys"
    # the reference runs as a process of its own too: same threads, same floating-point reduction order
    base = [sys.executable, "-m", "clip_tao", "train", "-e", str(spec)]
    subprocess.run([*base, f"results_dir={reference}", f"train.sample_log={ref_log}"], env=env, check=True,
                   capture_output=True)  # fmt: skip

    killed_log = tmp_path / "killed.keys"
    command = [*base, f"train.sample_log={killed_log}"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_dir = tmp_path / "results" / "train"
    try:
        deadline = time.monotonic() + 300
        while not list(train_dir.glob("model_epoch_001_step_*.pth")):  # into the second epoch
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    latest = torch.load(train_dir / "clip_latest.pth", weights_only=True)
    assert latest["epoch"] < 6
    # the same command again picks up clip_latest.pth
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert killed_log.read_text() == ref_log.read_text()
    _assert_same_weights(reference / "train" / "clip_latest.pth", train_dir / "clip_latest.pth")
    shutil.rmtree(tmp_path / "shards")

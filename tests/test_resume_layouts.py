"""A run killed at a random step and resumed on another number of processes or loader workers trains, at every
step, the same samples as an uninterrupted run at the same global batch, and ends at its weights (real
processes: torchrun with gloo, SIGKILL to every process of the run)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import torch
import yaml

from tests.processes import children, kill_tree
from tests.shards import write_shardwriter

GLOBAL_BATCH = 8


def _spec(tiny_spec, tmp_path, kind: str):
    spec = tiny_spec(train={"num_epochs": 2, "checkpoint_interval_unit": "step", "checkpoint_interval": 1,
                            "num_threads": 1})  # fmt: skip
    data = yaml.safe_load(spec.read_text())
    if kind == "wds":
        write_shardwriter(tmp_path / "shards", 48, per_shard=8)  # 6 shards -> 4 sample streams
        data["dataset"]["train"] = {"type": "wds", "wds": {"root_dir": str(tmp_path / "shards"),
                                                           "samples_per_shard": 8}}  # fmt: skip
    data["dataset"]["train"]["num_workers"] = 0
    spec.write_text(yaml.safe_dump(data))
    return spec


def _command(spec, results, log, processes: int, workers: int) -> list[str]:
    batch = GLOBAL_BATCH // processes
    args = ["-m", "clip_tao", "train", "-e", str(spec), f"results_dir={results}", f"train.sample_log={log}",
            f"dataset.train.batch_size={batch}", f"dataset.train.num_workers={workers}"]  # fmt: skip
    if processes == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _steps(log) -> dict[int, list[str]]:
    """Step -> the sorted keys trained at that step, over every rank's log."""
    steps = defaultdict(list)
    for path in [log, *sorted(log.parent.glob(log.name + ".rank*"))]:
        for line in path.read_text().splitlines():
            step, key = line.split(" ", 1)
            steps[int(step)].append(key)
    return {step: sorted(keys) for step, keys in sorted(steps.items())}


def _kill_at_a_random_step(command, results) -> int:
    """Start ``command``; SIGKILL its whole process group once a random mid-run checkpoint exists."""
    stop = random.randint(2, 10)  # of the run's 12 steps
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    train = results / "train"
    try:
        deadline = time.monotonic() + 600
        while not list(train.glob(f"model_epoch_*_step_{stop:05d}.pth")):
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint in 600 s"
            time.sleep(0.02)
        kill_tree(process.pid)  # every process at once, as a preempted node loses them
    finally:
        process.wait()
    return stop


@pytest.mark.parametrize(
    ("kind", "before", "after"),
    [
        ("wds", (2, 1), (1, 2)),  # 2 processes x 1 worker -> 1 process x 2 workers
        ("wds", (1, 0), (2, 2)),  # 1 process in-process loading -> 2 processes x 2 workers
        ("custom", (2, 0), (1, 1)),
    ],
)
def test_a_run_resumed_on_another_layout_is_the_uninterrupted_run(tiny_spec, tmp_path, kind, before, after):
    spec = _spec(tiny_spec, tmp_path, kind)
    reference = _reference_run(spec, tmp_path)
    results, log = tmp_path / "interrupted", tmp_path / "interrupted.keys"
    stop = _kill_at_a_random_step(_command(spec, results, log, *before), results)
    latest = torch.load(results / "train" / "clip_latest.pth", weights_only=True)
    assert latest["global_step"] >= stop and latest["world_size"] == before[0]
    # the same command on the new layout continues from clip_latest.pth
    done = subprocess.run(_command(spec, results, log, *after), env=_env(), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(tmp_path / "reference.keys", reference, log, results, stop, after[0])


def _reference_run(spec, tmp_path):
    """One uninterrupted process at the global batch: the run every other layout must reproduce."""
    reference = tmp_path / "reference"
    done = subprocess.run(_command(spec, reference, tmp_path / "reference.keys", 1, 0), env=_env(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return reference


def _assert_same_run(reference_log, reference, log, results, stop: int | None, world_size: int) -> None:
    """The same samples at every step (none twice, none left out) and the same final weights."""
    stop = "(not killed)" if stop is None else stop
    want, got = _steps(reference_log), _steps(log)
    assert len(want) == 12 and all(len(keys) == GLOBAL_BATCH for keys in want.values())
    assert got == want, f"killed after step {stop}"
    a = torch.load(reference / "train" / "clip_latest.pth", weights_only=True)
    b = torch.load(results / "train" / "clip_latest.pth", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12 and b["world_size"] == world_size
    for name, value in a["model"].items():
        got = b["model"][name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias has no gradient in exact arithmetic (a softmax ignores a constant added to every
            # logit of a query), so what AdamW does with it is rounding noise amplified to the learning rate:
            # another sum order (2 processes vs 1) moves it by up to lr x steps. Its query and value parts count.
            d = len(value) // 3
            value, got = torch.cat([value[:d], value[2 * d :]]), torch.cat([got[:d], got[2 * d :]])
        torch.testing.assert_close(got, value, rtol=0, atol=1e-5, msg=f"{name}, killed after step {stop}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_elastic_restarts_a_killed_process_and_the_run_resumes_by_itself(tiny_spec, tmp_path):
    """``torchrun --nnodes=1:2 --max-restarts``: one of the two processes is SIGKILLed mid-epoch; torchrun
    restarts the group, which continues from clip_latest.pth on its own and ends as the uninterrupted run.
    Without ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` the run is refused before it starts (a restart would hang)."""
    spec = _spec(tiny_spec, tmp_path, "wds")
    reference = _reference_run(spec, tmp_path)
    results, log = tmp_path / "elastic", tmp_path / "elastic.keys"
    command = _command(spec, results, log, 2, 1)
    at = command.index("--standalone")
    command[at : at + 1] = ["--nnodes=1:2", "--max-restarts=2", "--rdzv-backend=c10d",
                            f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=elastic-test",
                            "--rdzv-conf=last_call_timeout=1"]  # fmt: skip
    # torchrun's default: the workers share the agent's store, which a restart would find stale: refused at once.
    refused = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in refused.stderr, refused.stderr[-2000:]
    assert not list((results / "train").glob("model_epoch_*.pth"))
    stop = random.randint(2, 10)
    process = subprocess.Popen(command, env={**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not list((results / "train").glob(f"model_epoch_*_step_{stop:05d}.pth")):
            assert process.poll() is None, "training ended before a process could be killed"
            assert time.monotonic() < deadline, "no checkpoint in 600 s"
            time.sleep(0.02)
        workers = [pid for pid in children()[process.pid] if _is_trainer(pid)]  # torchrun's, not the loaders'
        assert len(workers) == 2, workers
        os.kill(random.choice(workers), signal.SIGKILL)
        _, stderr = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    statuses = [json.loads(line)["status"] for line in (results / "train" / "status.json").read_text().splitlines()]
    assert statuses.count("STARTED") == 2 and statuses[-1] == "SUCCESS"  # a second attempt, resumed
    _assert_same_run(tmp_path / "reference.keys", reference, log, results, stop, 2)


def _is_trainer(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"clip_tao" in f.read()
    except OSError:
        return False

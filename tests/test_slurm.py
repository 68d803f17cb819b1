"""Slurm: ``srun`` without torchrun, and the README's sbatch + torchrun script, on a real Slurm the test starts."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.slurm_cluster import SlurmCluster, why_not_available

# -- reading Slurm's environment (no cluster needed) ---------------------------------------------------


def _adopt(env: dict[str, str]) -> dict[str, str]:
    from clip_tao.engine.launcher import adopt_slurm_environment

    env = dict(env)
    adopt_slurm_environment(env)
    return env


STEP = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123456"}  # fmt: skip


def test_a_task_of_an_srun_step_gets_torchruns_variables():
    env = _adopt(STEP)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert env["MASTER_PORT"] == str(15000 + 3456)  # PyTorch Lightning's rule: every task agrees
    assert env["MASTER_ADDR"] == "gpu07"


def test_torchrun_or_the_user_wins_and_a_batch_script_is_one_process():
    under_torchrun = _adopt({**STEP, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5"})
    assert (under_torchrun["RANK"], under_torchrun["WORLD_SIZE"]) == ("5", "16")
    chosen = _adopt({**STEP, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"})
    assert (chosen["MASTER_ADDR"], chosen["MASTER_PORT"]) == ("10.1.2.3", "29500")
    # an sbatch script's own shell: the job's task count, but no step, and one process
    batch_shell = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}
    assert "RANK" not in _adopt(batch_shell)
    assert "RANK" not in _adopt({**STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})


@pytest.mark.parametrize("nodelist", ["node1", "gpu[07-08]", "a-b[001,005-007],c[1-2]", "rack1-n[10-11]", "x,y"])
def test_first_host_of_a_host_list_as_scontrol_expands_it(nodelist, monkeypatch):
    from clip_tao.engine import launcher

    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)  # the fallback reading, without scontrol
    ours = launcher.first_host(nodelist)
    if why_not_available() is None:  # Slurm's own expansion is the reference where it is installed
        expanded = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        assert ours == expanded.stdout.split()[0]
    else:
        assert ours == {"node1": "node1", "gpu[07-08]": "gpu07", "a-b[001,005-007],c[1-2]": "a-b001",
                        "rack1-n[10-11]": "rack1-n10", "x,y": "x"}[nodelist]  # fmt: skip


# -- a real cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def _spec(tiny_spec, tmp_path):
    return tiny_spec(
        train={"num_epochs": 2, "checkpoint_interval_unit": "step", "checkpoint_interval": 3, "num_threads": 1},
        dataset={"train": {"batch_size": 8, "num_workers": 0, "datasets": [{"image_dir": str(tmp_path / "data" / "train")}]}},
    )  # fmt: skip


def _weights(results):
    state = torch.load(results / "train" / "clip_latest.pth", weights_only=True)
    return state, state["model"]


def _torchrun_reference(spec, results):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "clip_tao", "train", "-e", str(spec), f"results_dir={results}"]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return _weights(results)


def test_srun_without_torchrun_is_one_two_process_run(cluster, tiny_spec, tmp_path):
    spec = _spec(tiny_spec, tmp_path)
    results = tmp_path / "srun"
    run = cluster.run(
        ["srun", "-n", "2", "--kill-on-bad-exit=1", sys.executable, "-m", "clip_tao", "train", "-e", str(spec),
         f"results_dir={results}"],
        cwd=str(tmp_path), timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:] + cluster.logs()
    state, weights = _weights(results)
    assert state["world_size"] == 2
    lines = [json.loads(line) for line in (results / "train" / "status.json").read_text().splitlines()]
    assert [line["status"] for line in lines].count("STARTED") == 1 and lines[-1]["status"] == "SUCCESS"
    reference_state, reference = _torchrun_reference(spec, tmp_path / "torchrun")
    assert state["global_step"] == reference_state["global_step"]
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)


def _readme_sbatch_script() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(#!/bin/bash\n#SBATCH.*?)```", text, flags=re.S)
    assert blocks, "the README's sbatch script is gone"
    return blocks[0]


def test_the_readmes_sbatch_torchrun_script_runs(cluster, tiny_spec, tmp_path):
    """The script as the README prints it, with the cluster's sizes: one node, two CPU processes, no GPU request."""
    script = _readme_sbatch_script()
    spec = _spec(tiny_spec, tmp_path)
    results = tmp_path / "sbatch"
    script = re.sub(r"#SBATCH --gpus-per-node=\d+\n", "", script)
    script = script.replace("--nodes=4", "--nodes=1").replace("--nproc_per_node=8", "--nproc_per_node=2")
    script = re.sub(r"--cpus-per-task=\d+", f"--cpus-per-task={cluster.cpus}", script)
    script = script.replace("spec.yaml", str(spec))
    script = re.sub(r"results_dir=\S+", f"results_dir={results}", script)
    assert "torchrun" in script and "SLURM_JOB_NODELIST" in script
    path = tmp_path / "job.sh"
    path.write_text(script)
    run = cluster.run(["sbatch", "--wait", f"--output={tmp_path / 'job.out'}", str(path)], cwd=str(tmp_path),
                      timeout=900)  # fmt: skip
    output = (tmp_path / "job.out").read_text(errors="replace") if (tmp_path / "job.out").exists() else ""
    assert run.returncode == 0, run.stderr[-2000:] + output[-3000:] + cluster.logs()
    state, _ = _weights(results)
    assert state["world_size"] == 2 and state["epoch"] == 2


def _job_state(cluster, job: str) -> str:
    shown = cluster.run(["scontrol", "show", "job", job], timeout=60).stdout
    found = re.search(r"JobState=(\w+)", shown)
    return found[1] if found else "UNKNOWN"


def _wait_for(predicate, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


def test_a_preempted_job_checkpoints_its_step_and_resumes_exactly_when_requeued(cluster, tiny_spec, tmp_path):
    """``scancel --signal=TERM`` (what a preemption sends first): the step in progress finishes, its checkpoint
    is written, the job stops; ``scontrol requeue`` runs the job's script again, which continues from there and
    ends as an uninterrupted run. No trained step is lost."""
    from tests.test_resume_layouts import _assert_same_run, _reference_run, _steps
    from tests.test_resume_layouts import _spec as layout_spec

    spec = layout_spec(tiny_spec, tmp_path, "wds")
    spec.write_text(spec.read_text().replace("checkpoint_interval: 1", "checkpoint_interval: 1000"))
    reference = _reference_run(spec, tmp_path)  # one process, no Slurm: checkpoints only where asked
    results, log = tmp_path / "preempted", tmp_path / "preempted.keys"
    script = tmp_path / "job.sh"
    stop = random.randint(2, 9)  # of the run's 12 steps
    held = tmp_path / "held"
    held.mkdir()
    # The run waits in the step that trains step `stop` until the signal is there (tests/hold_phase.py), so the
    # SIGTERM meets it mid-run however fast the machine is.
    script.write_text(
        "#!/bin/bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\nexport OMP_NUM_THREADS=1\n"
        f"export HOLD_PHASE=step HOLD_STEP={stop} HOLD_DIR={held}\n"
        f"srun {sys.executable} {REPO / 'tests' / 'hold_phase.py'} train -e {spec} results_dir={results} "
        f"train.sample_log={log} dataset.train.batch_size=8 dataset.train.num_workers=0\n"
    )
    submitted = cluster.run(["sbatch", "--parsable", f"--output={tmp_path / 'job.out'}", str(script)],
                            cwd=str(tmp_path))  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    _wait_for(lambda: (held / "held").exists(), f"step {stop}")
    assert cluster.run(["scancel", "--signal=TERM", job]).returncode == 0
    _wait_for(lambda: _job_state(cluster, job) not in ("RUNNING", "COMPLETING", "PENDING"), "the stop")
    latest = torch.load(results / "train" / "clip_latest.pth", weights_only=True)
    trained = max(_steps(log)) + 1  # steps are logged from 0
    assert stop <= latest["global_step"] == trained < 12, (stop, trained)  # the last trained step is saved
    lines = (results / "train" / "status.json").read_text().splitlines()
    assert json.loads(lines[-1])["status"] == "FAILURE" and "SIGTERM" in lines[-1]
    # Slurm's requeue, as a preempted job's: the same job runs the script again, once its launch credential has
    # expired (the test cluster's cred_expire: 10 s; 120 s by default).
    requeued = cluster.run(["scontrol", "requeue", job])
    assert requeued.returncode == 0, requeued.stderr

    def requeued_run_ended() -> bool:
        shown = cluster.run(["scontrol", "show", "job", job], timeout=60).stdout
        return "Restarts=1" in shown and re.search(r"JobState=(COMPLETED|FAILED|CANCELLED)\b", shown) is not None

    _wait_for(requeued_run_ended, "the requeued run")
    shown = cluster.run(["scontrol", "show", "job", job]).stdout
    output = (tmp_path / "job.out").read_text(errors="replace")
    state = " ".join(w for w in shown.split() if w.startswith(("JobState=", "Reason=", "ExitCode=", "Restarts=")))
    assert "JobState=COMPLETED" in shown and "Restarts=1" in shown, (
        f"{state}\n{output[-3000:]}\n{cluster.logs()[-3000:]}"
    )
    assert "stopping for SIGTERM after step" in output, output[-3000:]
    _assert_same_run(tmp_path / "reference.keys", reference, log, results, stop, 1)

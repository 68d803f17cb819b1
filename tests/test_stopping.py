"""A signal stops training whatever it is doing: each phase is held on purpose (tests/hold_phase.py, or a FIFO
among the images that blocks the loader worker opening it), then signalled, beside two busy processes and
with loader workers. The run must end with its final FAILURE line, its results folder released and no
worker left behind. Bounds are generous (a loaded machine): nothing here measures speed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, make_dataset, write_spec

HOLD = str(Path(__file__).with_name("hold_phase.py"))
STOP_BOUND_S = 60.0  # from the signal to the end of the process, on a machine as busy as CI's
REACH_BOUND_S = 240.0  # from the start to the held phase


@pytest.fixture(scope="module")
def busy_machine():
    """Two processes that burn a CPU each for the module's tests."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


@pytest.fixture
def runs():
    """Started commands; whatever a failed test leaves is killed, and FIFO readers are let go."""
    started: list[tuple[subprocess.Popen, Path]] = []
    yield started
    for process, folder in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for fifo in folder.rglob("*"):
            if fifo.is_fifo():
                _let_readers_go(fifo)


def _let_readers_go(fifo: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a blocked reader gets end-of-file


def _spec(tmp_path: Path, *, fifo_in: str | None = None, workers: int = 2, **train) -> Path:
    data = {name: make_dataset(tmp_path / "data" / name, count, seed=seed)
            for name, count, seed in (("train", 32, 1), ("val", 16, 2))}  # fmt: skip
    if fifo_in is not None:  # an image whose reading blocks until someone writes it: nobody does
        os.mkfifo(data[fifo_in] / "img_zzz_blocks.jpg")
        (data[fifo_in] / "img_zzz_blocks.txt").write_text("a square that never arrives\n")
    spec = {
        "results_dir": str(tmp_path / "results"),
        "model": {"type": "tiny-clip"},
        "dataset": {
            "train": {"batch_size": 16, "num_workers": workers, "datasets": [{"image_dir": str(data["train"])}]},
            "val": {"batch_size": 16, "num_workers": workers, "datasets": [{"image_dir": str(data["val"])}]},
        },
        "train": {"num_epochs": 1000, "precision": "fp32", "optim": {"warmup_steps": 2}, **train},
        "wandb": {"enable": False},
    }
    return write_spec(tmp_path / "spec.yaml", spec)


def _start(runs, tmp_path: Path, command: list[str], phase: str = "none", **popen) -> subprocess.Popen:
    hold = tmp_path / "hold"
    hold.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOLD_PHASE": phase, "HOLD_DIR": str(hold), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **popen,  # its own process group: a terminal's Ctrl-C reaches only it
    )  # fmt: skip
    runs.append((process, tmp_path))
    return process


def _train(runs, tmp_path: Path, spec: Path, phase: str = "none", **popen) -> subprocess.Popen:
    return _start(runs, tmp_path, [sys.executable, HOLD, "train", "-e", str(spec)], phase, **popen)


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _blocked_on_fifo(process: subprocess.Popen) -> bool:
    for pid in _descendants(process.pid):
        try:
            if Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner":
                return True
        except OSError:
            pass
    return False


def _wait_until(condition, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + REACH_BOUND_S
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {what}: {process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"the run never reached {what}"
        time.sleep(0.1)


def _held(tmp_path: Path) -> bool:
    return (tmp_path / "hold" / "held").exists()


def _deliver(process: subprocess.Popen, how: str, pid: int | None = None) -> int:
    """``sigint`` to the process alone, ``ctrl-c`` (SIGINT) to its whole process group, or ``sigterm``."""
    if how == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)
        return signal.SIGINT
    signum = signal.SIGINT if how == "sigint" else signal.SIGTERM
    os.kill(pid or process.pid, signum)
    return signum


def _assert_stopped(process: subprocess.Popen, tmp_path: Path, signum: int, workers: set[int], rc: bool = True):
    try:
        _, err = process.communicate(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {STOP_BOUND_S:.0f} s after {signal.Signals(signum).name}") from None
    name = signal.Signals(signum).name
    if rc:
        assert process.returncode == 128 + signum, err[-3000:]
        assert f"clip-tao train: interrupted ({name})" in err
    train = tmp_path / "results" / "train"
    last = json.loads((train / "status.json").read_text().splitlines()[-1])
    assert last["status"] == "FAILURE" and f"interrupted ({name})" in last["message"], (last, err[-3000:])
    assert not (train / ".clip-tao.lock").exists()
    assert not list(train.glob(".*.tmp"))  # no half-written checkpoint left
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)], "loader workers outlived the run"
    return err


DROPPED_IN_DEL = """
import os, signal, time
from clip_tao import stopping

class Slow:
    def __del__(self):  # Python drops what is raised here: "Exception ignored in ..."
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)

with stopping.install():
    try:
        Slow()  # gone at once: __del__ runs, the KeyboardInterrupt is dropped
        print("went on", flush=True)
        time.sleep(60)
    except KeyboardInterrupt as exc:
        print("stopped by", exc.args[0], flush=True)
"""


def test_an_interruption_dropped_in_a_del_is_raised_again():
    """The mechanism on its own: the handler's exception is lost where Python drops exceptions, the stop is not."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", DROPPED_IN_DEL], env=env, capture_output=True, text=True,
                         timeout=STOP_BOUND_S)  # fmt: skip
    assert run.stdout.split("\n")[:2] == ["went on", "stopped by SIGINT"], run.stderr
    assert "Exception ignored in" in run.stderr


TORCHRUN_STAND_IN = """
import signal, sys, time
def stop(signum, frame):
    time.sleep(1.0)  # a moment to stop its own processes
    print("child stopped by", signal.Signals(signum).name, flush=True)
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
print("child ready", flush=True)
time.sleep(60)
"""

LAUNCHER = """
import os, sys
from clip_tao import cli, stopping

with stopping.install():
    try:
        cli._run_torchrun([sys.executable, "-c", sys.argv[1]], dict(os.environ))
    except KeyboardInterrupt:
        print("launcher stopped", flush=True)
"""


def test_the_launcher_passes_a_stop_on_to_torchrun_and_waits():
    """``train.num_gpus > 1`` runs torchrun as a child: a SIGINT to the launcher alone reaches it (killing it
    would leave its processes training), and the launcher ends after it. A script stands in for torchrun."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", LAUNCHER, TORCHRUN_STAND_IN]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline() == "child ready\n"
    run.send_signal(signal.SIGINT)
    out, _ = run.communicate(timeout=STOP_BOUND_S)
    assert out.splitlines() == ["child stopped by SIGINT", "launcher stopped"]


@pytest.mark.parametrize(
    ("fifo_in", "how"),
    [("train", "ctrl-c"), ("val", "sigint")],
    ids=["loader-wait-ctrl-c", "validation-sigint"],
)
def test_a_signal_stops_a_run_waiting_for_its_loader(busy_machine, runs, tmp_path, fifo_in, how):
    """A worker blocks opening a FIFO image: the main process waits for its batch (in training or validation)."""
    run = _train(runs, tmp_path, _spec(tmp_path, fifo_in=fifo_in))
    _wait_until(lambda: _blocked_on_fifo(run), "a worker blocked on the FIFO", run)
    workers = _descendants(run.pid)
    _assert_stopped(run, tmp_path, _deliver(run, how), workers)


def test_a_signal_during_a_loader_workers_start_is_not_lost(busy_machine, runs, tmp_path):
    """The signal comes while the main process forks a worker (in a fork hook, where Python drops exceptions):
    it used to be printed as "Exception ignored" and training went on."""
    run = _train(runs, tmp_path, _spec(tmp_path), "fork")
    _wait_until(lambda: _held(tmp_path), "the fork of a loader worker", run)
    signum = _deliver(run, "sigint")
    time.sleep(1.0)  # the signal lands inside the fork's hook
    workers = _descendants(run.pid)
    (tmp_path / "hold" / "release").write_text("")
    _assert_stopped(run, tmp_path, signum, workers)


def test_sigterm_while_workers_shut_down_and_ctrl_c_ignored(busy_machine, runs, tmp_path):
    """Workers that take long to exit at the end of the epoch; the run was started with SIGINT ignored (a
    background job): it says how to stop it, and SIGTERM does."""
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    run = _train(runs, tmp_path, _spec(tmp_path), "worker_exit", preexec_fn=ignore_sigint)
    _wait_until(lambda: _held(tmp_path), "a worker's exit", run)
    workers = _descendants(run.pid)
    err = _assert_stopped(run, tmp_path, _deliver(run, "sigterm"), workers)
    assert f"Ctrl-C is ignored here (started in the background): stop with SIGTERM (kill {run.pid})" in err


def test_a_signal_during_a_checkpoint_write(busy_machine, runs, tmp_path):
    """The checkpoint's write hangs in the kernel (as on a hung file system); its temporary file goes."""
    spec = _spec(tmp_path, checkpoint_interval_unit="step", checkpoint_interval=1)
    run = _train(runs, tmp_path, spec, "checkpoint")
    _wait_until(lambda: _held(tmp_path), "the checkpoint write", run)
    assert Path((tmp_path / "hold" / "temp-file").read_text()).exists()
    workers = _descendants(run.pid)
    _assert_stopped(run, tmp_path, _deliver(run, "ctrl-c"), workers)


@pytest.mark.parametrize("how", ["sigint", "ctrl-c"])
def test_a_signal_during_a_collective_of_two_gloo_processes(busy_machine, runs, tmp_path, how):
    """torchrun, two CPU processes, one loader worker each: rank 0 waits in a collective for rank 1, which
    does not come. SIGINT to rank 0 alone cannot interrupt the C call: the run ends after the grace period
    with its final status; a Ctrl-C reaches every process and rank 1's exit ends the collective."""
    spec = _spec(tmp_path, workers=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", HOLD,
               "train", "-e", str(spec)]  # fmt: skip
    torchrun = _start(runs, tmp_path, command, "collective")
    _wait_until(lambda: _held(tmp_path), "rank 0's collective", torchrun)
    rank0 = int((tmp_path / "hold" / "held").read_text())
    time.sleep(1.0)  # into the collective's C call
    workers = _descendants(torchrun.pid)
    signum = _deliver(torchrun, how, pid=rank0)
    _assert_stopped(torchrun, tmp_path, signum, workers, rc=False)

"""Two hosts: network namespaces joined by a veth pair, each running its own torchrun (c10d rendezvous on the
first host's address, gloo over the link). The run equals a single-host run of as many processes, and a
two-host run killed at a random step continues on one host with one process."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from tests.processes import kill_tree
from tests.test_resume_layouts import _assert_same_run, _command, _env, _reference_run, _spec

SUBNET = "10.213.7"  # only inside the two namespaces this test makes
RDZV_PORT = 29431


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def two_hosts():
    """``(host0, host1)``: namespace names with ``veth0`` = 10.213.7.1 and ``veth1`` = 10.213.7.2."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (apt-get install iproute2)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    names = (f"clip-tao-h0-{os.getpid()}", f"clip-tao-h1-{os.getpid()}")
    made = []
    try:
        for name in names:
            done = _ip("netns", "add", name)
            if done.returncode != 0:
                pytest.skip(f"network namespaces cannot be made here: {done.stderr.strip()}")
            made.append(name)
        steps = [
            ("link", "add", "veth0", "netns", names[0], "type", "veth", "peer", "name", "veth1", "netns", names[1]),
            ("-n", names[0], "addr", "add", f"{SUBNET}.1/24", "dev", "veth0"),
            ("-n", names[1], "addr", "add", f"{SUBNET}.2/24", "dev", "veth1"),
        ]
        steps += [("-n", name, "link", "set", dev, "up") for name in names for dev in ("lo",)]
        steps += [("-n", names[0], "link", "set", "veth0", "up"), ("-n", names[1], "link", "set", "veth1", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"ip {' '.join(step)} failed here: {done.stderr.strip()}")
        ping = subprocess.run(["ip", "netns", "exec", names[0], sys.executable, "-c",
                               f"import socket; socket.create_connection(('{SUBNET}.2', 9), 2)"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if "Connection refused" not in ping.stderr:  # a refused connection proves the link carries packets
            pytest.skip(f"the veth link carries no traffic here: {ping.stderr.strip()[-200:]}")
        yield names
    finally:
        for name in made:
            _ip("netns", "del", name)


def _host_command(spec, results, log, host: int, host_name: str) -> tuple[list[str], dict[str, str]]:
    """torchrun on one host: one process, c10d rendezvous hosted by host 0's agent."""
    command = _command(spec, results, log, 2, 0)
    at = command.index("--standalone")
    command[at : at + 2] = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                            f"--rdzv-endpoint={SUBNET}.1:{RDZV_PORT}", "--rdzv-id=two-hosts",
                            f"--rdzv-conf=is_host={1 if host == 0 else 0}",
                            # the namespaces share the machine's /etc/hosts, where its name is 127.0.0.1: each
                            # agent gives its own link address instead of a host name
                            f"--local-addr={SUBNET}.{host + 1}"]  # fmt: skip
    env = {**_env(), "GLOO_SOCKET_IFNAME": f"veth{host}"}
    return ["ip", "netns", "exec", host_name, *command], env


def test_two_hosts_train_what_one_host_with_two_processes_trains(two_hosts, tiny_spec, tmp_path):
    spec = _spec(tiny_spec, tmp_path, "wds")
    reference, reference_log = tmp_path / "one_host", tmp_path / "one_host.keys"
    done = subprocess.run(_command(spec, reference, reference_log, 2, 0), env=_env(), capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results, log = tmp_path / "two_hosts", tmp_path / "two_hosts.keys"
    processes = []
    for host, name in enumerate(two_hosts):
        command, env = _host_command(spec, results, log, host, name)
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))  # fmt: skip
    errors = []
    for process in processes:
        try:
            errors.append(process.communicate(timeout=900)[1])
        finally:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(e[-2000:] for e in errors)
    _assert_same_run(reference_log, reference, log, results, None, 2)


def test_a_two_host_run_killed_at_a_random_step_continues_on_one_host(two_hosts, tiny_spec, tmp_path):
    """Both hosts lose every process at once (SIGKILL, as a preempted job's nodes do); the same run started
    again on one host with one process, at the same global batch, trains what an uninterrupted run trains."""
    spec = _spec(tiny_spec, tmp_path, "wds")
    reference = _reference_run(spec, tmp_path)
    results, log = tmp_path / "two_hosts", tmp_path / "two_hosts.keys"
    stop = random.randint(2, 10)  # of the run's 12 steps
    processes = []
    try:
        for host, name in enumerate(two_hosts):
            command, env = _host_command(spec, results, log, host, name)
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + 600
        while not list((results / "train").glob(f"model_epoch_*_step_{stop:05d}.pth")):
            assert all(p.poll() is None for p in processes), "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint in 600 s"
            time.sleep(0.02)
    finally:
        kill_tree(*(process.pid for process in processes))  # every process of both hosts at once
        for process in processes:
            process.wait()
    done = subprocess.run(_command(spec, results, log, 1, 0), env=_env(), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(tmp_path / "reference.keys", reference, log, results, stop, 1)

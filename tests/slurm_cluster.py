"""A real one-node Slurm cluster for the tests: Debian's munged, slurmctld and slurmd on the loopback.

Every daemon runs from a temporary folder with its own configuration, key, sockets and free ports, so nothing
of the machine's own Slurm or munge setup is used or touched. Needs root (slurmd starts the job steps as the
submitting user) and the Debian packages ``slurmctld slurmd slurm-client munge`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "srun", "sbatch", "scontrol")


def why_not_available() -> str | None:
    """``None`` when a cluster can be started here, else the reason (for a skip)."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """``with SlurmCluster(folder) as cluster: cluster.run(["srun", "-n", "2", ...])``."""

    def __init__(self, folder: Path, cpus: int | None = None):
        self.folder = Path(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self._pids: list[Path] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm's clients (srun, sbatch, scancel, squeue) to reach this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**env, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        f = self.folder
        for sub in ("munge", "state", "spool", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(f / "munge", 0o700)
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        socket_path = f / "munge" / "munge.socket"
        pid = f / "munge" / "munged.pid"
        subprocess.run(
            ["munged", "--force", f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={pid}",
             f"--log-file={f / 'log' / 'munged.log'}", f"--seed-file={f / 'munge' / 'seed'}"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self._pids.append(pid)
        self.conf.write_text(
            "\n".join([
                "ClusterName=cliptaotest",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                # cred_expire also sets how long a requeued job waits before it starts again (default 120 s)
                f"AuthInfo=socket={socket_path},cred_expire=10",
                "CredType=cred/munge",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={f / 'state'}",
                f"SlurmdSpoolDir={f / 'spool'}",
                f"SlurmctldPidFile={f / 'slurmctld.pid'}",
                f"SlurmdPidFile={f / 'slurmd.pid'}",
                f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "MpiDefault=none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "ReturnToService=2",
                "KillWait=30",  # seconds between a cancel's SIGTERM and its SIGKILL, as clusters give
                "JobRequeue=1",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ])
        )  # fmt: skip
        env = self.env
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=env, check=True, capture_output=True, timeout=60)
        self._pids.append(f / "slurmctld.pid")
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", self.node], env=env, check=True, capture_output=True,
                       timeout=60)  # fmt: skip
        self._pids.append(f / "slurmd.pid")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=60)
            if state.returncode == 0 and state.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the test cluster's node did not come up in 120 s; see {f / 'log'}")

    def run(self, command: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, **kwargs)  # fmt: skip

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((self.folder / "log").glob("*"))
        )

    def __exit__(self, *exc) -> None:
        for pid_file in reversed(self._pids):
            with contextlib.suppress(OSError, ValueError, IndexError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        time.sleep(1)

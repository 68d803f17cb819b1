"""Who started this process: torchrun, or Slurm's ``srun`` without torchrun in between.

torchrun hands every process ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
the rest of clip-tao reads only those. A job step that ``srun`` starts with several tasks carries the same facts
in Slurm's own variables instead, so :func:`adopt_slurm_environment` writes torchrun's from them, as open_clip
and PyTorch Lightning do, and ``srun -n 8 clip-tao train ...`` becomes one 8-process run rather than 8
unrelated ones.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, MutableMapping

from clip_tao.errors import ConfigError

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_LAUNCHED = "CLIP_TAO_SLURM_TASKS"  # set when the variables above were taken from Slurm's


def adopt_slurm_environment(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set torchrun's variables from Slurm's when this process is one task of a multi-task ``srun`` step.

    Nothing changes when any of torchrun's variables is set already (``srun torchrun ...``: torchrun's numbering
    wins), outside a job step (an ``sbatch`` script's own shell has ``SLURM_NTASKS`` but is one process), or in a
    one-task step. ``MASTER_ADDR`` defaults to the step's first host and ``MASTER_PORT`` to
    15000 + the job id's last four digits (Lightning's rule), so every task of the step agrees without being told.
    Returns whether the variables were set.
    """
    if any(name in environ for name in TORCHRUN_VARS) or "SLURM_STEP_ID" not in environ:
        return False
    try:
        rank = int(environ["SLURM_PROCID"])
        world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"])
        local = int(environ.get("SLURM_LOCALID", "0"))
    except (KeyError, ValueError):
        return False
    if world <= 1:
        return False
    environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), SLURM_LAUNCHED: "1"})
    if "MASTER_ADDR" not in environ:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        environ["MASTER_ADDR"] = first_host(nodes)
    if "MASTER_PORT" not in environ:
        job = re.sub(r"\D", "", environ.get("SLURM_JOB_ID", "")) or "0"
        environ["MASTER_PORT"] = str(15000 + int(job[-4:]))
    log.debug("Slurm task %d of %d (local %d), rendezvous %s:%s", rank, world, local, environ["MASTER_ADDR"],
              environ["MASTER_PORT"])  # fmt: skip
    return True


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm host list (``gpu[03-05,9],cpu1`` -> ``gpu03``).

    Slurm's own ``scontrol show hostnames`` expands it where it is installed; the fallback reads the first
    name, which is all a rendezvous needs."""
    if shutil.which("scontrol"):
        try:
            done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                  timeout=30)  # fmt: skip
            if done.returncode == 0 and done.stdout.split():
                return done.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def check_elastic_restarts(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse torchrun restarts on the rendezvous store torchrun shares with its workers.

    Since PyTorch 2.5 the c10d rendezvous lends its agent's TCP store to the workers
    (``TORCHELASTIC_USE_AGENT_STORE``), and PyTorch 2.14 keeps that one store across restarts. A restarted
    group then finds the previous group's addresses in it and its process group connects to processes that
    are gone: it waits until the collective timeout, 30 minutes (pytorch/pytorch#135712). With
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` every group gets a store of its own. One line at the start costs
    nothing; a hang after a preemption costs the job.
    """
    restarts = environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restarts.isdigit() and int(restarts) > 0:
        raise ConfigError(
            f"torchrun --max-restarts={restarts} with the rendezvous store shared with the workers: a restarted "
            "group would find the previous group's addresses there and hang (pytorch/pytorch#135712); start "
            "torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment"
        )

"""Multi-process runs on PyTorch's own machinery: ``torchrun`` starts the processes, ``torch.distributed``
connects them (NCCL on GPUs, gloo on CPUs), DDP or FSDP wraps the model for training.

A single-node run with ``<task>.num_gpus > 1`` (train, evaluate, inference) re-launches itself under torchrun
(:func:`relaunch_command`); multi-node runs are started by the user with torchrun on every node.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clip_tao.engine.device import select_device
from clip_tao.engine.launcher import SLURM_LAUNCHED, TORCHRUN_VARS, check_elastic_restarts
from clip_tao.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def setup_distributed(section, timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> DistContext:
    """Join the process group torchrun (or ``srun``, see :mod:`clip_tao.engine.launcher`) prepared, or describe
    a single process.

    ``section`` is the task's spec section (``train``, ``evaluate``, ``inference``: ``num_gpus``, ``gpu_ids``
    and, for training, ``num_nodes``). Each process uses GPU ``LOCAL_RANK`` (torchrun's numbering of the
    visible GPUs) or, without GPUs, the CPU with the gloo backend. ``timeout`` bounds every collective.
    """
    if not under_torchrun():
        if getattr(section, "num_nodes", 1) > 1:
            raise ConfigError(
                f"train.num_nodes={section.num_nodes}: start multi-node training with torchrun on every node "
                "(see the README's scale-out section), or set train.num_nodes=1"
            )
        return DistContext(0, 1, 0, select_device(section.num_gpus, section.gpu_ids))
    check_elastic_restarts()
    rank, world, local = (int(os.environ[v]) for v in TORCHRUN_VARS)
    if torch.cuda.is_available() and section.num_gpus > 0:
        if SLURM_LAUNCHED in os.environ and torch.cuda.device_count() == 1:
            local = 0  # Slurm bound one GPU to this task (--gpus-per-task=1, --gpu-bind): it is device 0
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started local rank {local}, but only {torch.cuda.device_count()} GPU(s) are visible: "
                "lower --nproc_per_node"
            )
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    log.info("process %d of %d (local %d) on %s, backend %s", rank, world, local, device, backend)
    return DistContext(rank, world, local, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def relaunch_command(section, argv: Sequence[str], task: str = "train") -> tuple[list[str], dict[str, str]] | None:
    """The torchrun command (and environment) that runs ``clip-tao argv`` on ``<task>.num_gpus`` local GPUs
    (``section`` is the task's spec section); ``None`` when this process should run by itself."""
    if section.num_gpus <= 1 or getattr(section, "num_nodes", 1) > 1 or under_torchrun() or "LOCAL_RANK" in os.environ:
        return None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        log.warning(
            "%s.num_gpus=%d but no GPU is visible: running in one CPU process "
            "(for several CPU processes: torchrun --standalone --nproc_per_node=N $(which clip-tao) %s ...)",
            task, section.num_gpus, task,
        )  # fmt: skip
        return None
    env = dict(os.environ)
    if len(section.gpu_ids) >= section.num_gpus:
        ids = section.gpu_ids[: section.num_gpus]
        if max(ids) >= available:
            raise ConfigError(f"{task}.gpu_ids={section.gpu_ids}: GPU {max(ids)} does not exist ({available} visible)")
        if "CUDA_VISIBLE_DEVICES" not in env:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
    elif section.num_gpus > available:
        raise ConfigError(f"{task}.num_gpus={section.num_gpus} but only {available} GPU(s) are visible")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={section.num_gpus}",
        "-m", "clip_tao", *argv,
    ]  # fmt: skip
    return command, env


# -- wrapping the model -----------------------------------------------------------------------------
class ContrastiveForward(nn.Module):
    """The module DDP/FSDP wrap: both towers plus the logit parameters, so every trained parameter is used
    inside ``forward`` (DDP's unused-parameter check and FSDP's hooks see them).

    Returns ``(image_emb [B,D], text_emb [B,D], logit_scale (log), logit_bias)``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor):
        image, text = self.model(pixels, input_ids)
        # "* 1" makes a tensor of the forward pass from the parameter (open_clip returns them likewise).
        return image, text, self.model.logit_scale * 1, self.model.logit_bias * 1


def wrap_for_training(model: nn.Module, ctx: DistContext, strategy: str) -> nn.Module:
    """``ContrastiveForward(model)``, wrapped in DDP or FSDP when there are several processes."""
    net = ContrastiveForward(model)
    if not ctx.distributed:
        return net
    if strategy == "fsdp":
        return _fully_shard(net, ctx)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Frozen towers have requires_grad=False and are ignored by DDP; everything else is used every step.
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=False)


def _fully_shard(net: ContrastiveForward, ctx: DistContext) -> nn.Module:
    """FSDP (``fully_shard``): every transformer block a unit, the rest in the root unit.

    Scalar parameters (logit scale and bias) cannot be sharded; they stay replicated and their gradients
    are averaged by :func:`sync_replicated_grads`.
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # PyTorch < 2.6
        raise ConfigError(
            "train.distributed_strategy=fsdp needs PyTorch >= 2.6 (fully_shard); upgrade torch or use ddp"
        ) from exc

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for module in net.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
    # Scalars, also stored as shape [1] (transformers' SigLIP logit scale/bias): a shard of one value is empty.
    scalars = {p for p in net.parameters() if p.numel() == 1}
    fully_shard(net, mesh=mesh, ignored_params=scalars)
    net._replicated_params = [p for p in scalars if p.requires_grad]
    return net


def sync_replicated_grads(net: nn.Module, world_size: int) -> None:
    """Average the gradients FSDP leaves alone (the replicated scalars); no-op otherwise."""
    for p in getattr(net, "_replicated_params", []):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def is_fsdp(net: nn.Module) -> bool:
    return hasattr(net, "_replicated_params")


def no_gradient_sync(net: nn.Module):
    """A context in which backward passes accumulate gradients locally (gradient accumulation)."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if is_fsdp(net):
        return _fsdp_no_sync(net)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(net):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


# -- small collectives (no-ops in one process) ------------------------------------------------------
def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(ctx: DistContext, obj: Any) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0 only (``None`` elsewhere): the other ranks never hold
    what the rest sent, unlike :func:`gather_objects`."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_min(ctx: DistContext, value: int) -> int:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.long, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_mean(ctx: DistContext, value: float) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size

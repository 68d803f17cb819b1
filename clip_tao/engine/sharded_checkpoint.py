"""Sharded training checkpoints under FSDP: every rank writes its own shard with ``torch.distributed.checkpoint``.

No process gathers the whole model. A checkpoint is a folder, TAO's name with ``.dcp`` for ``.pth``
(``model_epoch_000_step_00012.dcp/``)::

    .metadata          DCP's index: every tensor's shape and dtype, and which file holds which piece
    __0_0.distcp ...   the model and optimiser pieces one rank held (one file a rank)
    train_state.pth    everything else (schedule, epoch, step, data position, RNG states, best, config, the
                       optimiser's hyperparameters) as plain data: ``torch.load(weights_only=True)`` reads it

DCP stores only tensors here, so loading never unpickles anything from the shards. Because DCP reshards on
load, a checkpoint written by N processes continues a run on M processes, under FSDP, DDP or in one process
(:func:`load_sharded`), and evaluate, inference and export read it in one process without a process group
(:func:`read_model_state`). The folder is written under a temporary name and renamed when every rank is done, so
a kill during the write leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import os
import pickle
import shutil
import warnings
from typing import Any

import torch
from torch import nn

from clip_tao.engine import distributed as D
from clip_tao.engine.finite import check_weights
from clip_tao.errors import ModelError, OutputError, TrainingError
from clip_tao.io.atomic import atomic_path, replace_folder

SHARDED_SUFFIX = ".dcp"
TRAIN_STATE = "train_state.pth"
METADATA = ".metadata"
FORMAT = 1


def sharded_name(name: str) -> str:
    """``model_epoch_000_step_00012.pth`` -> ``model_epoch_000_step_00012.dcp``."""
    return name.removesuffix(".pth") + SHARDED_SUFFIX


def is_sharded_checkpoint(path: str) -> bool:
    """A checkpoint folder (written by :func:`save_sharded` or by DCP elsewhere), not a file."""
    return os.path.isdir(path)


# -- writing (every rank) ----------------------------------------------------------------------------
def save_sharded(
    path: str,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    ctx: D.DistContext,
    step: int,
    last_saved: str | None,
) -> None:
    """Write the sharded checkpoint ``path``; collective: every rank calls it with its own ``net`` shards.

    ``train_state`` (rank 0's is written) is the plain-data rest of the trainer's state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = get_model_state_dict(net)
    optim = get_optimizer_state_dict(net, optimizer)
    _check_finite_everywhere(model, ctx, step, last_saved)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")  # the same name on every rank
    if ctx.is_main:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)  # left by a killed run
    D.barrier(ctx)
    # Only tensors go through DCP (its loader unpickles anything else); the hyperparameters go with the rest.
    try:
        dcp.save({"model": model, "optimizer": optim["state"]}, checkpoint_id=tmp)
    except CheckpointException as exc:  # a rank could not write its shard (a full disk ...): every rank gets it
        raise OutputError(
            f"cannot write the sharded checkpoint {path}: {_first_line(exc)}; free some space or point results_dir "
            "at another disk (the previous checkpoints are intact)"
        ) from exc
    if ctx.is_main:
        _write_train_state(tmp, train_state, optim["param_groups"])
        replace_folder(tmp, path)
    D.barrier(ctx)


def refresh_train_state(path: str, train_state: dict[str, Any], ctx: D.DistContext) -> None:
    """Rewrite only the plain data of the folder ``path``, whose tensors are this step's already (the step's
    checkpoint, written again as the epoch's); atomic, so the folder is never missing. Collective."""
    if ctx.is_main:
        _write_train_state(path, train_state, read_train_state(path)["optimizer_param_groups"])
    D.barrier(ctx)


def _write_train_state(folder: str, train_state: dict[str, Any], param_groups: list) -> None:
    plain = {"format": FORMAT, **train_state, "optimizer_param_groups": param_groups}
    with atomic_path(os.path.join(folder, TRAIN_STATE)) as part:
        torch.save(plain, part)


def _check_finite_everywhere(model: dict, ctx: D.DistContext, step: int, last_saved: str | None) -> None:
    """:func:`check_weights` on this rank's own pieces; a bad piece on any rank stops every rank (the save is
    a collective: a rank that stopped alone would leave the others waiting)."""
    local = {name: t.to_local() if hasattr(t, "to_local") else t for name, t in model.items()}
    try:
        check_weights(local, step, last_saved)
        error = None
    except TrainingError as exc:
        error = str(exc)
    errors = [e for e in D.gather_objects(ctx, error) if e]
    if errors:
        raise TrainingError(errors[0])


# -- reading -----------------------------------------------------------------------------------------
def read_train_state(path: str) -> dict[str, Any]:
    """The plain-data part of a sharded checkpoint (epoch, step, schedule, RNG, config ...), without the tensors."""
    _check_complete(path)
    file = os.path.join(path, TRAIN_STATE)
    if not os.path.isfile(file):
        raise ModelError(f"sharded checkpoint {path!r} has no {TRAIN_STATE}: it was not written by clip-tao train")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ModelError(f"sharded checkpoint {path!r}: {TRAIN_STATE} cannot be read: {_first_line(exc)}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"sharded checkpoint {path!r}: {TRAIN_STATE} holds a {type(state).__name__}, not a dict")
    return state


def sharded_model_keys(path: str) -> list[str]:
    """The model's parameter names in ``path`` (clip-tao's names, without reading a tensor)."""
    return [_our_name(fqn) for fqn in _model_entries(_check_complete(path))]


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """The whole model's weights (clip-tao's names, on the CPU) of a sharded checkpoint, read in this process
    alone (no process group; the optimiser's pieces are not read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    entries = _model_entries(_check_complete(path))
    if not entries:
        raise ModelError(f"sharded checkpoint {path!r} holds no model weights (no 'model.' entries)")
    template = {"model": {fqn: torch.empty(meta.size, dtype=meta.properties.dtype) for fqn, meta in entries.items()}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": intended, one process reads
            dcp.load(template, storage_reader=FileSystemReader(path), no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP wraps a bad shard's error (a BaseException)
        raise ModelError(f"sharded checkpoint {path!r} cannot be read: {_first_line(exc)}") from exc
    return {_our_name(fqn): t for fqn, t in template["model"].items()}


def load_sharded(path: str, net: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list) -> None:
    """Load model and optimiser state of ``path`` into the wrapped ``net`` (FSDP, DDP or the plain
    ``ContrastiveForward``) on any number of processes; collective under FSDP and DDP.

    ``param_groups`` are the optimiser's saved hyperparameters (from :func:`read_train_state`).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _check_complete(path)
    # Templates of this layout's own pieces: DCP fills each with its part of the saved tensors (it reshards).
    model = get_model_state_dict(net)
    optim_state = get_optimizer_state_dict(net, optimizer)["state"]  # initialises an empty optimiser's state
    state = {"model": model, "optimizer": optim_state}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one process: DCP warns that it reads without a process group
            dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as exc:
        raise ModelError(
            f"sharded checkpoint {path!r} does not fit this model and optimiser: {_first_line(exc)}"
        ) from exc
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, optimizer, {"state": state["optimizer"], "param_groups": param_groups})


def _check_complete(path: str):
    """DCP's index of ``path``, after checking that every shard file it names is there and long enough; one
    :class:`ModelError` naming the folder and the file otherwise. Returns the index.

    Every reader calls this first: DCP's own reader then unpickles an index that has passed the allow-list.
    """
    if not os.path.isdir(path):
        raise ModelError(f"sharded checkpoint {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise ModelError(
            f"{path!r} is a folder without {METADATA}: not a torch.distributed.checkpoint checkpoint (or one whose "
            "writing was interrupted); give a .pth file or a complete .dcp folder"
        )
    try:
        with open(os.path.join(path, METADATA), "rb") as f:
            metadata = _IndexUnpickler(f).load()
    except Exception as exc:
        raise ModelError(f"sharded checkpoint {path!r}: {METADATA} cannot be read: {_first_line(exc)}") from exc
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ModelError(
                f"sharded checkpoint {path!r} is incomplete: shard {name} is missing (copy the whole folder)"
            )
        if os.path.getsize(file) < size:
            raise ModelError(
                f"sharded checkpoint {path!r} is incomplete: shard {name} is truncated "
                f"({os.path.getsize(file)} of {size} bytes)"
            )
    return metadata


class _IndexUnpickler(pickle.Unpickler):
    """DCP's index (``.metadata``, a pickle) read through an allow-list: DCP's own metadata classes, torch's
    sizes, dtypes and layouts. A crafted index that names anything else (a function to call) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            value = getattr(torch, name, None)
            if name == "Size" or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        elif module.startswith("torch.distributed.checkpoint.") or (module, name) in _PLAIN_GLOBALS:
            value = getattr(importlib.import_module(module), name, None)
            if (module, name) in _PLAIN_GLOBALS or (
                isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum))
            ):
                return value
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index: not read")


# What DCP's index holds besides its own classes: a tensor layout by name, the checkpoint's path, containers.
_PLAIN_GLOBALS = {
    ("torch.serialization", "_get_layout"),
    *(("pathlib", name) for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


def _model_entries(metadata) -> dict[str, Any]:
    """Model name (as the wrapped module names it) -> DCP's tensor metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {
        key.removeprefix("model."): meta
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }


def _our_name(fqn: str) -> str:
    # The trainer wraps the model in ContrastiveForward, whose attribute is ``model``.
    return fqn.removeprefix("model.")


def _first_line(exc: BaseException) -> str:
    """The cause's first line: DCP's CheckpointException carries the failing rank's traceback."""
    cause = exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))[0]  # (exception, stack summary) of the first failing rank
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__

"""``checkpoint``: FSDP checkpoints of one model written and read by N real processes (torchrun; gloo on the CPU,
NCCL with one GPU a process), two ways:

- **sharded**: ``torch.distributed.checkpoint``, every rank writes its own shard; what ``clip-tao train`` writes
  under FSDP (:func:`clip_tao.engine.sharded_checkpoint.save_sharded` / ``load_sharded``);
- **gathered**: every shard sent to rank 0 (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``),
  which writes one ``.pth``; every rank reads the whole file back to resume. This is how FSDP checkpoints were
  written before.

The model is randomly initialised and the optimiser (AdamW) has taken one step, so its two moments are in the
checkpoint too, as in training. Reported: save and load seconds (median of ``--repeats``, from a barrier to a
barrier), the bytes each rank wrote, and each rank's peak resident memory before and after the checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

NAME = "checkpoint"
HELP = "FSDP checkpoint save/load seconds and bytes per rank: sharded (DCP, every rank) vs gathered (rank 0)"
LAYOUTS = ("sharded", "gathered")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny-clip", help="a model type that builds offline (random weights)")
    parser.add_argument("--openclip-arch", default=None, help="an open_clip architecture instead, e.g. ViT-B-32")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/clip_tao_bench_checkpoint", help="where the checkpoints are written")


def run(args) -> dict:
    os.makedirs(args.dir, exist_ok=True)
    runs = [_launch(args, layout) for layout in LAYOUTS]
    first = runs[0]
    return {"benchmark": "checkpoint", "model": first["model"], "parameters": first["parameters"],
            "model_mb": first["model_mb"], "processes": args.processes, "repeats": args.repeats,
            "runs": [{k: v for k, v in r.items() if k not in ("model", "parameters", "model_mb")} for r in runs]}  # fmt: skip


def _launch(args, layout: str) -> dict:
    """One torchrun job that saves and loads ``--repeats`` checkpoints in ``layout``; the ranks' reports joined."""
    with tempfile.TemporaryDirectory(dir=args.dir) as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.processes}", os.path.abspath(__file__), layout,
                   args.openclip_arch or "", args.model, str(args.repeats), out]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the {layout} checkpoint run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        ranks = []
        for rank in range(args.processes):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    zero = ranks[0]
    return {"layout": layout, "model": zero["model"], "parameters": zero["parameters"], "model_mb": zero["model_mb"],
            "save_s": zero["save_s"], "load_s": zero["load_s"],
            "mb_written_per_rank": [r["mb_written"] for r in ranks],
            "peak_rss_mb_per_rank_before": [r["peak_rss_mb_before"] for r in ranks],
            "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks]}  # fmt: skip


# -- one rank of the job -------------------------------------------------------------------------
def _rank(layout: str, arch: str, model_name: str, repeats: int, out: str) -> None:
    import resource
    import time

    import torch

    from benchmarks.core import build_random_model, register_openclip_arch
    from clip_tao.config.schema import OptimConfig, TrainConfig
    from clip_tao.engine import distributed as D
    from clip_tao.engine.optim import build_optimizer

    ctx = D.setup_distributed(TrainConfig())
    model_type = register_openclip_arch(arch) if arch else model_name
    model, _ = build_random_model(model_type)
    model.to(ctx.device)
    parameters = sum(p.numel() for p in model.parameters())
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    net = D.wrap_for_training(model, ctx, "fsdp")
    optimizer = build_optimizer(model, OptimConfig())
    for p in model.parameters():  # one step: the optimiser's moments exist, as in training
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def timed(fn) -> float:
        D.barrier(ctx)
        start = time.perf_counter()
        fn()
        D.barrier(ctx)
        return time.perf_counter() - start

    save, load = (_sharded if layout == "sharded" else _gathered)(net, optimizer, ctx)
    before = peak_mb()
    saves, loads, written = [], [], 0
    for i in range(repeats):
        path = os.path.join(out, f"{layout}_{i}")
        saves.append(timed(lambda path=path: save(path)))
        loads.append(timed(lambda path=path: load(path)))
        written = _bytes_of_rank(path, ctx.rank)
        D.barrier(ctx)
        if ctx.is_main:  # a real-size model's checkpoints add up: keep one at a time on disk
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + ".pth")
    report = {"model": model_type, "parameters": parameters, "model_mb": round(model_mb, 1),
              "save_s": round(statistics.median(saves), 3), "load_s": round(statistics.median(loads), 3),
              "mb_written": round(written / 1e6, 2), "peak_rss_mb_before": round(before), "peak_rss_mb": round(peak_mb())}  # fmt: skip
    with open(os.path.join(out, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(report, f)
    D.cleanup_distributed()


def _sharded(net, optimizer, ctx):
    from clip_tao.engine.sharded_checkpoint import load_sharded, read_train_state, save_sharded

    def save(path: str) -> None:
        save_sharded(path, net, optimizer, {"global_step": 0}, ctx, 0, None)

    def load(path: str) -> None:
        load_sharded(path, net, optimizer, read_train_state(path)["optimizer_param_groups"])

    return save, load


def _gathered(net, optimizer, ctx):
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save(path: str) -> None:
        state = {"model": get_model_state_dict(net, options=gather),
                 "optimizer": get_optimizer_state_dict(net, optimizer, options=gather)}  # fmt: skip
        if ctx.is_main:
            torch.save(state, path + ".pth")

    def load(path: str) -> None:
        state = torch.load(path + ".pth", map_location="cpu", weights_only=True)  # every rank reads the whole file
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(net, state["model"], options=full)
        set_optimizer_state_dict(net, optimizer, state["optimizer"], options=full)

    return save, load


def _bytes_of_rank(path: str, rank: int) -> int:
    """What ``rank`` wrote: its shard file (rank 0 also DCP's index and the plain data), or the single file."""
    if os.path.isfile(path + ".pth"):
        return os.path.getsize(path + ".pth") if rank == 0 else 0
    names = [f"__{rank}_0.distcp"] + ([".metadata", "train_state.pth"] if rank == 0 else [])
    return sum(os.path.getsize(os.path.join(path, n)) for n in names if os.path.exists(os.path.join(path, n)))


if __name__ == "__main__":  # one rank, started by torchrun from _launch
    scripts = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [scripts, os.path.dirname(scripts)]  # benchmarks.core, and this checkout's clip_tao
    _rank(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])

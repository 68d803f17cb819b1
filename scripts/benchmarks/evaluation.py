"""``eval``: wall time and peak memory of the exact chunked retrieval metrics against the bare similarity matrix
product of the same size (the floor), and against the dense computation at a size where it fits. Each
measurement runs in a fresh process (imports and any compilation included, as ``clip-tao evaluate`` pays them)
so its time and peak memory are its own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.core import ENTRY, peak_rss_mb

NAME = "eval"
HELP = "exact chunked retrieval metrics: time and memory against the bare product"


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=20000, help="images = captions")
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--chunk", type=int, default=0, help="captions a block (0: the library's default)")
    parser.add_argument("--dense-n", type=int, default=0, help="also run dense vs chunked at this size (0: skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--captions-per-image", type=int, default=1, help="5 for a COCO-shaped set")
    parser.add_argument(
        "--counting",
        nargs="+",
        default=["eager"],
        choices=["eager", "compiled"],
        help="how the metrics count each block (clip_tao.metrics.COUNTING); each in its own process",
    )
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of product and metrics, alternating; the ratio is of the medians (the bare "
                        "product alone varies by 10 %% between runs on a 2-CPU machine)")  # fmt: skip


def eval_child(mode: str, n: int, per: int, dim: int, chunk: int, device: str, counting: str) -> dict:
    """One measurement in a fresh process: the clock starts before clip-tao's metrics module is imported."""
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    owner = torch.arange(n).repeat_interleave(per)
    texts = torch.nn.functional.normalize(images[owner] + 0.5 * torch.randn(n * per, dim, generator=g), dim=-1)
    images, texts = images.to(device), texts.to(device)
    base = peak_rss_mb()
    start = time.perf_counter()
    from clip_tao import metrics

    metrics.COUNTING = counting
    step = chunk or max(1, metrics.BLOCK_ELEMENTS // n)
    figures = {}
    if mode == "chunked":
        figures = metrics.retrieval_metrics(images, texts, owner, chunk_size=step)
    elif mode == "dense":  # the whole similarity matrix at once
        figures = metrics.retrieval_metrics(images, texts, owner, chunk_size=n * per)
    else:  # the floor: the bare similarity product, in the same blocks, result discarded
        for s in range(0, n * per, step):
            _ = texts[s : s + step] @ images.T
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "mode": mode if mode == "product" else f"{mode} ({counting})",
        "images": n,
        "captions": n * per,
        "seconds": round(seconds, 2),
        "extra_peak_rss_mb": round(peak_rss_mb() - base),
        "figures": {k: figures[k] for k in ("i2t_R@1", "t2i_R@1", "i2t_mAP", "t2i_mAP", "t2i_MeanR") if k in figures},
    }


def bench_eval(args) -> dict:
    """Chunked metrics (each ``--counting``) and the bare product at ``--n``, ``--repeat`` rounds; dense and
    chunked at ``--dense-n``."""

    def child(mode: str, n: int, counting: str = "eager") -> dict:
        cmd = [sys.executable, ENTRY, "_eval_child", mode, str(n), str(args.captions_per_image), str(args.dim),
               str(args.chunk), args.device, counting]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"eval measurement {mode!r} failed: {last}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    modes = [("product", "eager")] + [("chunked", counting) for counting in args.counting]
    rounds = [[child(mode, args.n, counting) for mode, counting in modes] for _ in range(max(1, args.repeat))]
    runs = [run for round_ in rounds for run in round_]
    seconds = {run["mode"]: statistics.median(r["seconds"] for r in runs if r["mode"] == run["mode"]) for run in runs}
    ratios = {mode: round(s / seconds["product"], 2) for mode, s in seconds.items() if mode != "product"}
    chunked = [run for run in runs if run["mode"] != "product"]
    same = all(run["figures"] == chunked[0]["figures"] for run in chunked)
    if args.dense_n:
        runs += [child("dense", args.dense_n), child("chunked", args.dense_n)]
    return {"benchmark": "eval", "dim": args.dim, "device": args.device, "vs_product": ratios,
            "median_seconds": seconds, "same_figures": same, "runs": runs, "load_average": os.getloadavg()}  # fmt: skip


run = bench_eval

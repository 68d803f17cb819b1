#!/usr/bin/env python
"""Throughput on one GPU, before and after the fast defaults, in one go (under 8 minutes on an H100/H200).

For ``siglip2-so400m-patch16-256``, ``c-radio_v3-b`` and ``ViT-L-14-SigLIP-CLIPA-224`` (random weights, no
downloads), each in a fresh ``scripts/benchmark.py`` process:

- train, before: bf16, batch 32, foreach AdamW, full-fp32 products (the defaults this check replaced);
- train, after: bf16, batch 128, fused AdamW, TF32 (the defaults now), and the same with ``--compile``;
- embed images, before: bf16, batch 8; after: bf16, batch 256 (eager and torch.compile);
- eval: exact metrics at 200k x 200k (D 1152) on the GPU, eager and compiled counting, against the bare product.

    python scripts/gpu_check_throughput.py                  # everything, then the table
    python scripts/gpu_check_throughput.py --budget 300     # stop starting new runs after 300 s
    python scripts/gpu_check_throughput.py --models tiny-clip --eval-device cpu --eval-n 2000   # checks the script

Runs start in order of importance and stop when ``--budget`` seconds are spent; the table shows what ran.
Each run's JSON is printed as it finishes (and kept in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py")
MODELS = ("siglip2-so400m-patch16-256", "c-radio_v3-b", "ViT-L-14-SigLIP-CLIPA-224")
BEFORE = ["--batch", "32", "--no-fused", "--no-fast-math"]
AFTER = ["--batch", "128"]
STEPS = os.environ.get("GPU_CHECK_STEPS", "10")


def plan(models: list[str], eval_device: str, eval_n: int) -> list[tuple[str, list[str]]]:
    runs = []
    for model in models:
        train = ["train", "--model", model, "--precision", "bf16", "--steps", STEPS]
        runs.append((f"{model} train before", train + BEFORE))
        runs.append((f"{model} train after", train + AFTER))
        embed = ["embed", "--model", model, "--precision", "bf16", "--no-onnx", "--iters", STEPS]
        runs.append((f"{model} embed before", embed + ["--batch", "8", "--no-compile"]))
        runs.append((f"{model} embed after", embed + ["--batch", "256"]))
        if model == models[0]:
            evaluate = ["eval", "--n", str(eval_n), "--dim", "1152", "--device", eval_device]
            runs.append((f"eval {eval_n} x {eval_n}", [*evaluate, "--counting", "eager", "compiled"]))
    runs += [(f"{model} train after + compile", ["train", "--model", model, "--precision", "bf16", "--steps", STEPS,
                                                 *AFTER, "--compile"]) for model in models]  # fmt: skip
    return runs


def rows_of(name: str, result: dict) -> list[list[str]]:
    """Table rows: what ran, samples (or items) a second, TFLOP/s, MFU."""
    if result["benchmark"] == "train":
        return [[name, str(result["batch"]), f"{result['train_samples_per_s']:.1f}", f"{result['tflops']:.4g}",
                 f"{result['mfu_percent']}"]]  # fmt: skip
    if result["benchmark"] == "embed":
        out = []
        for kind, run in result["runs"].items():
            if "image_items_per_s" in run:
                out.append([f"{name} ({kind}, images)", str(result["batch"]), f"{run['image_items_per_s']:.1f}",
                            f"{run['image_tflops']:.4g}", f"{run['image_mfu_percent']}"])  # fmt: skip
        return out
    return [[f"{name}: {run['mode']}", "-", f"{run['seconds']:.2f} s", "-", "-"] for run in result["runs"]]


def run_in_own_group(command: list[str], timeout: float) -> tuple[int | None, str, str]:
    """``(returncode, stdout, stderr)``; on timeout the run and every process it started are killed
    (``eval`` measures in child processes) and the return code is ``None``."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, "", ""
    return process.returncode, stdout, stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=450, help="seconds after which no new run starts")
    parser.add_argument("--run-timeout", type=float, default=240, help="seconds one run may take")
    parser.add_argument("--out", default="gpu_check_throughput.jsonl")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model types (tiny-clip checks the script)")
    parser.add_argument("--eval-device", default="cuda")
    parser.add_argument("--eval-n", type=int, default=200000, help="images = captions of the evaluation run")
    args = parser.parse_args()
    start = time.perf_counter()
    table = []
    with open(args.out, "w", encoding="utf-8") as log:
        for name, command in plan(args.models, args.eval_device, args.eval_n):
            left = args.budget - (time.perf_counter() - start)
            if left <= 0:
                print(f"budget spent: skipped {name}", flush=True)
                continue
            began = time.perf_counter()
            returncode, stdout, stderr = run_in_own_group([sys.executable, BENCH, *command],
                                                          min(args.run_timeout, left + 60))  # fmt: skip
            if returncode is None:
                print(f"{name}: timed out", flush=True)
                continue
            if returncode != 0:
                print(f"{name}: failed\n{stderr[-2000:]}", flush=True)
                continue
            result = json.loads(stdout[stdout.index("{") :])
            result["check_name"], result["wall_s"] = name, round(time.perf_counter() - began, 1)
            log.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
            table += rows_of(name, result)
    header = ["run", "batch", "samples/s", "TFLOP/s", "MFU %"]
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *table]:
        print(" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

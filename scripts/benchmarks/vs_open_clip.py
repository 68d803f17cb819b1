"""``vs-open-clip``: samples/s of clip-tao's trainer against open_clip's own (``open_clip_train``) on the same
architecture, data and settings, each in its own process. Needs pandas: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time

from benchmarks.core import REPO, run_or_explain, status_seconds

NAME = "vs-open-clip"
HELP = "clip-tao's trainer against open_clip_train on tiny-clip and data/demo"

OPEN_CLIP_LAUNCH = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)
# open_clip's progress line: epoch, samples so far in the epoch, mean step time since its last line.
EPOCH_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*Batch \(t\): ([0-9.]+),")


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of both trainers (0: in-process)")
    parser.add_argument(
        "--runs", type=int, default=5, help="pairs of runs, clip-tao and open_clip alternating which goes first"
    )


def bench_vs_open_clip(args) -> dict:
    """clip-tao's trainer against open_clip's (``open_clip_train.main``) on the same architecture and data.

    ``tiny-clip`` (an open_clip config, registered with open_clip for its run), ``data/demo/train`` (a CSV for
    open_clip), the quickstart's optimiser, loss, crop scale and fp32, the same batch, epochs and loader
    workers; each trainer in its own process, as its users start it. Samples/s of each epoch's training loop
    (loader start-up included: neither keeps workers between epochs), median over the epochs after the first.
    open_clip's epoch time is read from its own log, at its default interval: each line gives the mean step
    time since the previous line and how many samples the epoch has seen.

    ``--runs`` pairs, one run of each trainer a pair, the first of a pair alternating (clip-tao, open_clip,
    open_clip, clip-tao ...) so a machine's drift favours neither; every pair's ratio is printed as it comes
    (stderr), then the median ratio and the range. A single pair proves little on a shared machine.
    """
    import importlib.util
    import tempfile

    if importlib.util.find_spec("open_clip_train") is None or importlib.util.find_spec("pandas") is None:
        raise SystemExit("vs-open-clip needs open_clip's trainer and pandas: pip install -e '.[bench]'")
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    runs = []
    with tempfile.TemporaryDirectory() as out:
        config, table = _open_clip_inputs(out)
        for pair in range(args.runs):
            order = ("clip_tao", "open_clip_train") if pair % 2 == 0 else ("open_clip_train", "clip_tao")
            figures: dict = {"pair": pair + 1, "first": order[0], "load_average_1min_before": _load()}
            for trainer in order:
                folder = os.path.join(out, f"{trainer}_{pair}")
                if trainer == "clip_tao":
                    figures[trainer] = _run_clip_tao(args, folder)
                else:
                    figures[trainer] = _run_open_clip(args, folder, config, table)
            figures["clip_tao_vs_open_clip"] = round(
                figures["clip_tao"]["samples_per_s"] / figures["open_clip_train"]["samples_per_s"], 3
            )
            figures["load_average_1min_after"] = _load()
            runs.append(figures)
            print(
                f"pair {pair + 1}/{args.runs} ({order[0]} first): clip-tao {figures['clip_tao']['samples_per_s']}, "
                f"open_clip {figures['open_clip_train']['samples_per_s']} samples/s -> "
                f"{figures['clip_tao_vs_open_clip']:.2f}x (load {figures['load_average_1min_before']} -> "
                f"{figures['load_average_1min_after']})",
                file=sys.stderr,
                flush=True,
            )
    ratios = [run["clip_tao_vs_open_clip"] for run in runs]
    return {"benchmark": "vs-open-clip", "model": "tiny-clip", "batch": args.batch, "epochs": args.epochs,
            "workers": args.workers, "runs": runs,
            "clip_tao_vs_open_clip": {"median": round(statistics.median(ratios), 2),
                                      "range": [round(min(ratios), 2), round(max(ratios), 2)],
                                      "every_run": [round(r, 2) for r in ratios]},
            "samples_per_s_median": {
                name: round(statistics.median(run[name]["samples_per_s"] for run in runs), 1)
                for name in ("clip_tao", "open_clip_train")},
            "load_average": os.getloadavg()}  # fmt: skip


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _open_clip_inputs(out: str) -> tuple[str, str]:
    """open_clip's model config for ``tiny-clip`` and a CSV of ``data/demo/train`` (open_clip's csv format)."""
    images = os.path.join(REPO, "data", "demo", "train", "images")
    captions = os.path.join(REPO, "data", "demo", "train", "captions")
    with open(os.path.join(REPO, "clip_tao", "models", "configs", "tiny-clip.json"), encoding="utf-8") as f:
        arch = json.load(f)["config"]
    config = os.path.join(out, "tiny-clip.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump({"embed_dim": arch["embed_dim"], "vision_cfg": arch["vision_cfg"], "text_cfg": arch["text_cfg"]}, f)
    table = os.path.join(out, "train.csv")
    with open(table, "w", encoding="utf-8") as f:
        f.write("filepath\ttitle\n")
        for name in sorted(os.listdir(images)):
            with open(os.path.join(captions, os.path.splitext(name)[0] + ".txt"), encoding="utf-8") as c:
                f.write(f"{os.path.join(images, name)}\t{c.read().strip()}\n")
    return config, table


def _run_open_clip(args, folder: str, config: str, table: str) -> dict:
    os.makedirs(folder)
    started = time.perf_counter()
    open_clip_args = [
        "--train-data", table, "--dataset-type", "csv", "--model", "tiny-clip", "--batch-size", str(args.batch),
        "--epochs", str(args.epochs), "--workers", str(args.workers), "--precision", "fp32", "--lr", "1e-3",
        "--wd", "0.05", "--warmup", "30", "--aug-cfg", "scale=(0.8,1.0)", "--save-frequency", "0",
        "--zeroshot-frequency", "0", "--logs", folder, "--name", "open_clip", "--seed", "0",
    ]  # fmt: skip
    run_or_explain([sys.executable, "-c", OPEN_CLIP_LAUNCH, config, *open_clip_args], cwd=folder)
    seconds_all = time.perf_counter() - started
    seen: dict[int, tuple[int, float]] = {}  # epoch -> (samples, seconds) so far
    with open(os.path.join(folder, "open_clip", "out.log"), encoding="utf-8") as f:
        for match in filter(None, map(EPOCH_LINE.search, f)):
            epoch, samples, mean_step = int(match[1]), int(match[2]), float(match[3])
            before, seconds = seen.get(epoch, (0, 0.0))
            seen[epoch] = (samples, seconds + mean_step * (samples - before) / args.batch)
    if not seen:
        raise SystemExit("no 'Train Epoch' line in open_clip's out.log: has its log format changed?")
    return _summary([samples / seconds for _, (samples, seconds) in sorted(seen.items())], seconds_all)


def _run_clip_tao(args, results: str) -> dict:
    started = time.perf_counter()
    overrides = [f"results_dir={results}", f"train.num_epochs={args.epochs}",
                 f"dataset.train.batch_size={args.batch}", f"dataset.train.num_workers={args.workers}",
                 f"train.validation_interval={args.epochs}", f"train.checkpoint_interval={args.epochs}"]  # fmt: skip
    run_or_explain([sys.executable, "-m", "clip_tao.cli", "train", "-e", "specs/quickstart.yaml", *overrides], cwd=REPO)
    seconds_all = time.perf_counter() - started
    with open(os.path.join(results, "train", "status.json"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    rates = []
    for line in lines:  # one RUNNING line an epoch, with TAO's progress fields
        if line.get("status") == "RUNNING" and "time_per_step" in line:
            rates.append(args.batch / status_seconds(line["time_per_step"]))
    if not rates:
        raise SystemExit("no epoch line with time_per_step in clip-tao's status.json")
    return _summary(rates, seconds_all)


def _summary(rates: list[float], seconds: float) -> dict:
    steady = rates[1:] or rates
    return {"samples_per_s_per_epoch": [round(r, 1) for r in rates],
            "samples_per_s": round(statistics.median(steady), 1), "process_seconds": round(seconds, 1)}  # fmt: skip


run = bench_vs_open_clip

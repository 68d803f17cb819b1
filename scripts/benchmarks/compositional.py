"""``compositional``: what hard negatives buy. Two-shape scenes ("a red circle above a blue square"), tiny-clip
trained twice with the same data, seed and schedule: once on in-batch negatives only, once with hard negatives
made by rearranging each training caption's words (the two colours exchanged, the two shapes exchanged, the
relation reversed). Both are evaluated with ``clip-tao evaluate``: ``evaluate.mode=pairs`` on held-out images
against their rearranged captions (tags ``swap-att``, ``swap-obj``, ``replace-rel``), and retrieval R@1 on
the same held-out images. A quality figure, not a speed one: machine load does not change it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time

from make_demo_data import SHAPES, draw_shape  # the demo set's shapes (scripts/ is on the path)

from benchmarks.core import REPO

NAME = "compositional"
HELP = "swap accuracy and retrieval R@1 of tiny-clip trained with and without hard negatives"

# The demo set's colours, with starker white and black (the scenes have no background colour to tell apart).
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
          "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (15, 15, 15)}  # fmt: skip


def add_arguments(parser) -> None:
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=300, help="held-out images")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--negatives-per-sample", type=int, default=2)
    parser.add_argument("--loss", default="clip", choices=["clip", "siglip"])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="draws other scenes and another training order")
    parser.add_argument("--out", help="keep the data and runs here (default: a temporary folder)")


def draw_scene(rng: random.Random, size: int):
    """Two different shapes of two different colours, one above the other; the caption and its foils.

    The caption names either shape first ("a red circle above a blue square" or "a blue square below a red
    circle"), so the order of the words does not say which shape is on top: telling the captions apart takes
    the relation word and which colour goes with which shape. The foils use the same words rearranged.
    """
    from PIL import Image, ImageDraw

    top_shape, bottom_shape = rng.sample(SHAPES, 2)
    top_color, bottom_color = rng.sample(sorted(COLORS), 2)
    grey = 128 + rng.randint(-12, 12)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    side = size * 2 // 5
    for shape, color, y in ((top_shape, top_color, 0), (bottom_shape, bottom_color, size // 2)):
        x0 = rng.randint(0, size - side)
        y0 = y + rng.randint(0, size // 2 - side)
        draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLORS[color])

    def say(a_color, a_shape, relation, b_color, b_shape):
        return f"a {a_color} {a_shape} {relation} a {b_color} {b_shape}"

    top, bottom = (top_color, top_shape), (bottom_color, bottom_shape)
    first, relation, second = (top, "above", bottom) if rng.random() < 0.5 else (bottom, "below", top)
    other = "below" if relation == "above" else "above"
    caption = say(*first, relation, *second)
    swaps = {
        "swap-att": say(second[0], first[1], relation, first[0], second[1]),  # the colours exchanged
        "swap-obj": say(first[0], second[1], relation, second[0], first[1]),  # the shapes exchanged
        "replace-rel": say(*first, other, *second),  # the relation reversed
    }
    return image, caption, swaps


def write_data(root: str, train: int, val: int, size: int, seed: int = 0) -> dict:
    """``train/{images,captions,negatives}``, ``val/{images,captions}`` and ``val/pairs.jsonl``."""
    rng = random.Random(seed)
    paths = {}
    for split, count in (("train", train), ("val", val)):
        folders = {k: os.path.join(root, split, k) for k in ("images", "captions", "negatives")}
        for folder in folders.values():
            os.makedirs(folder, exist_ok=True)
        pairs = []
        for i in range(count):
            image, caption, swaps = draw_scene(rng, size)
            name = f"{i:05d}"
            image.save(os.path.join(folders["images"], name + ".png"))
            with open(os.path.join(folders["captions"], name + ".txt"), "w", encoding="utf-8") as f:
                f.write(caption + "\n")
            if split == "train":  # the hard negatives: this caption with its attributes swapped
                with open(os.path.join(folders["negatives"], name + ".txt"), "w", encoding="utf-8") as f:
                    f.write("\n".join(swaps.values()) + "\n")
            for tag, foil in swaps.items():
                pairs.append({"image": f"images/{name}.png", "positive": caption, "negatives": [foil], "tag": tag})
        if split == "val":
            with open(os.path.join(root, split, "pairs.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(p) + "\n" for p in pairs)
        paths[split] = folders
    return paths


def _spec(root: str, results: str, args, negatives: bool) -> str:
    import yaml

    entry = {"image_dir": os.path.join(root, "train", "images"), "caption_dir": os.path.join(root, "train", "captions")}
    if negatives:
        entry["negative_caption_dir"] = os.path.join(root, "train", "negatives")
    val = {"image_dir": os.path.join(root, "val", "images"), "caption_dir": os.path.join(root, "val", "captions")}
    spec = {
        "results_dir": results,
        "model": {"type": "tiny-clip"},
        "dataset": {
            "seed": 42 + args.seed,  # 42: the seed of the README's runs
            "train": {"batch_size": args.batch, "num_workers": args.workers, "datasets": [entry]},
            "val": {"batch_size": 64, "num_workers": args.workers, "datasets": [val]},
            # colours are what the captions name, positions too: no jitter, no flips, mild crops
            "augmentation": {"scale": [0.9, 1.0], "color_jitter": [0.0] * 5, "grayscale": 0.0},
        },
        "train": {
            "num_epochs": args.epochs,
            "loss_type": args.loss,
            "precision": "fp32",
            "validation_interval": args.epochs,
            "checkpoint_interval": args.epochs,
            "hard_negatives_per_sample": args.negatives_per_sample if negatives else 0,
            "optim": {"vision_lr": 1e-3, "text_lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 30},
        },  # fmt: skip
        "wandb": {"enable": False},
        "evaluate": {
            "checkpoint": os.path.join(results, "train", "clip_latest.pth"),
            "batch_size": 64,
            "num_workers": args.workers,
            "datasets": [val],
        },  # fmt: skip
    }
    path = os.path.join(results, "spec.yaml")
    os.makedirs(results, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f)
    return path


def _cli(*args: str) -> None:
    command = [sys.executable, "-m", "clip_tao.cli", *args]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")


def _results(results: str, mode: str) -> dict:
    with open(os.path.join(results, f"evaluate_{mode}", "results.json"), encoding="utf-8") as f:
        return json.load(f)


def train_and_evaluate(root: str, results: str, args, negatives: bool) -> dict:
    spec = _spec(root, results, args, negatives)
    start = time.perf_counter()
    _cli("train", "-e", spec)
    seconds = time.perf_counter() - start
    pairs_file = os.path.join(root, "val", "pairs.jsonl")
    _cli("evaluate", "-e", spec, "evaluate.mode=pairs", f"evaluate.pairs_file={pairs_file}",
         f"evaluate.results_dir={results}/evaluate_pairs")  # fmt: skip
    _cli("evaluate", "-e", spec, f"evaluate.results_dir={results}/evaluate_retrieval")
    pairs, retrieval = _results(results, "pairs"), _results(results, "retrieval")
    return {
        "swap_accuracy": round(pairs["pairs_accuracy"], 2),
        **{
            k.replace("pairs_accuracy/", "swap_accuracy/"): round(v, 2)
            for k, v in pairs.items()
            if k.startswith("pairs_accuracy/")
        },  # fmt: skip
        "i2t_R@1": round(retrieval["i2t_R@1"], 2),
        "t2i_R@1": round(retrieval["t2i_R@1"], 2),
        "train_seconds": round(seconds, 1),
    }


def bench_compositional(args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or scratch
        write_data(os.path.join(root, "data"), args.train, args.val, args.size, seed=args.seed)
        runs = {}
        for name, negatives in (("in_batch_negatives", False), ("hard_negatives", True)):
            runs[name] = train_and_evaluate(os.path.join(root, "data"), os.path.join(root, name), args, negatives)
            print(name, json.dumps(runs[name]), file=sys.stderr, flush=True)
    base, hard = runs["in_batch_negatives"], runs["hard_negatives"]
    return {
        "benchmark": "compositional",
        "settings": {
            k: getattr(args, k) for k in ("train", "val", "epochs", "batch", "negatives_per_sample", "loss", "seed")
        },
        "runs": runs,
        "swap_accuracy_gain": round(hard["swap_accuracy"] - base["swap_accuracy"], 2),
        "swap_accuracy_gain_per_tag": {
            key.removeprefix("swap_accuracy/"): round(hard[key] - base[key], 2)
            for key in base
            if key.startswith("swap_accuracy/")
        },  # fmt: skip
        "i2t_R@1_change": round(hard["i2t_R@1"] - base["i2t_R@1"], 2),
        "t2i_R@1_change": round(hard["t2i_R@1"] - base["t2i_R@1"], 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


run = bench_compositional

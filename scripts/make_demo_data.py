#!/usr/bin/env python
"""Generate the demo dataset that ships in ``data/demo`` (custom format: images/ + captions/).

Each image is a coloured shape on a coloured background; its caption names the size, colour, shape and
background ("a small red circle on a blue background"). Small enough to ship (< 1 MB), structured enough
that a tiny model learns it in a couple of minutes on a CPU. Deterministic: the same files every run.

    python scripts/make_demo_data.py --out data/demo --train 400 --val 100
"""

from __future__ import annotations

import argparse
import os
import random

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (0.22, 0.32), "large": (0.55, 0.75)}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross
        w, h = x1 - x0, y1 - y0
        draw.rectangle((x0 + w / 3, y0, x1 - w / 3, y1), fill=fill)
        draw.rectangle((x0, y0 + h / 3, x1, y1 - h / 3), fill=fill)


def make_sample(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    shape = rng.choice(SHAPES)
    color, background = rng.sample(sorted(COLORS), 2)
    size_word = rng.choice(sorted(SIZES))
    low, high = SIZES[size_word]
    side = int(size * rng.uniform(low, high))
    x0 = rng.randint(0, size - side)
    y0 = rng.randint(0, size - side)
    jitter = [max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[background]]
    image = Image.new("RGB", (size, size), tuple(jitter))
    draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + side, y0 + side), COLORS[color])
    return image, f"a {size_word} {color} {shape} on a {background} background"


def write_split(folder: str, count: int, rng: random.Random, size: int) -> None:
    images = os.path.join(folder, "images")
    captions = os.path.join(folder, "captions")
    os.makedirs(images, exist_ok=True)
    os.makedirs(captions, exist_ok=True)
    for i in range(count):
        image, caption = make_sample(rng, size)
        name = f"{i:05d}"
        # Mostly JPEG with some PNG, as real folders are.
        if i % 5 == 4:
            image.save(os.path.join(images, name + ".png"), optimize=True)
        else:
            image.save(os.path.join(images, name + ".jpg"), quality=85)
        with open(os.path.join(captions, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    write_split(os.path.join(args.out, "train"), args.train, rng, args.size)
    write_split(os.path.join(args.out, "val"), args.val, rng, args.size)
    print(f"wrote {args.train} training and {args.val} validation samples under {args.out}")


if __name__ == "__main__":
    main()

"""Shared fixtures: tiny generated datasets and specs that run offline on a CPU in seconds."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

# A test run started in the background by a shell without job control (`(pytest &)`, some CI runners) ignores
# Ctrl-C, and so would every process the tests start: the Ctrl-C tests would then test that. Give the runner
# Python's default so its children get it too (clip-tao's own ignored-Ctrl-C path has a test of its own).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40)}


def make_dataset(root: Path, count: int, seed: int = 0, size: int = 64, caption_dir: Path | None = None) -> Path:
    """``count`` coloured squares as ``root/img_XXX.jpg`` with captions in ``caption_dir`` (default: root)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    captions = caption_dir or root
    captions.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        color, background = rng.sample(sorted(COLORS), 2)
        image = Image.new("RGB", (size, size), COLORS[background])
        side = rng.randint(size // 4, size // 2)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        ImageDraw.Draw(image).rectangle((x, y, x + side, y + side), fill=COLORS[color])
        image.save(root / f"img_{i:03d}.jpg")
        (captions / f"img_{i:03d}.txt").write_text(f"a {color} square on {background}\n", encoding="utf-8")
    return root


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def tiny_spec(tmp_path: Path):
    """A factory for a small training spec over generated data; keyword arguments override sections."""

    def build(model_type: str = "tiny-clip", num_train: int = 48, num_val: int = 16, **sections) -> Path:
        train_dir = make_dataset(tmp_path / "data" / "train", num_train, seed=1)
        val_dir = make_dataset(tmp_path / "data" / "val", num_val, seed=2)
        spec = {
            "results_dir": str(tmp_path / "results"),
            "model": {"type": model_type},
            "dataset": {
                "train": {"batch_size": 16, "num_workers": 0, "datasets": [{"image_dir": str(train_dir)}]},
                "val": {"batch_size": 16, "num_workers": 0, "datasets": [{"image_dir": str(val_dir)}]},
            },
            "train": {"num_epochs": 2, "precision": "fp32", "optim": {"warmup_steps": 2}},
            "evaluate": {"num_workers": 0, "batch_size": 8},
            "inference": {"num_workers": 0, "batch_size": 8},
        }
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(spec.get(section), dict):
                spec[section].update(values)
            else:
                spec[section] = values
        return write_spec(tmp_path / "spec.yaml", spec)

    return build


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Keep CPU tests from oversubscribing a 2-core machine: the commands choose their threads themselves
    # (clip_tao.threads: the CPUs less one a loader worker); an OMP_NUM_THREADS given from outside still wins.
    if "OMP_NUM_THREADS" in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

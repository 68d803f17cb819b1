"""Shards for the tests, written three ways: webdataset.ShardWriter, img2dataset's layout, GNU tar."""

from __future__ import annotations

import io
import json
import random
import subprocess
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from tests.conftest import COLORS


def square(seed: int, size: int = 48, fmt: str = "JPEG") -> tuple[bytes, str]:
    """A coloured square on a background as encoded bytes, and its caption."""
    rng = random.Random(seed)
    color, background = rng.sample(sorted(COLORS), 2)
    image = Image.new("RGB", (size, size), COLORS[background])
    side = rng.randint(size // 4, size // 2)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    ImageDraw.Draw(image).rectangle((x, y, x + side, y + side), fill=COLORS[color])
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue(), f"a {color} square on {background}"


def write_shardwriter(folder: Path, count: int, per_shard: int, start: int = 0) -> list[Path]:
    """``shard-000000.tar ...`` by ``webdataset.ShardWriter`` with keys ``000000 ...`` (.jpg + .txt)."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(start, start + count):
            image, caption = square(i)
            sink.write({"__key__": f"{i:06d}", "jpg": image, "txt": caption})
    return sorted(folder.glob("shard-*.tar"))


def write_img2dataset(folder: Path, count: int, per_shard: int, start: int = 0) -> list[Path]:
    """img2dataset's output: ``00000.tar`` with ``000000000.jpg/.txt/.json``, plus ``00000_stats.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range((count + per_shard - 1) // per_shard):
        path = folder / f"{shard:05d}.tar"
        n = min(per_shard, count - shard * per_shard)
        with tarfile.open(path, "w") as tar:
            for k in range(n):
                i = start + shard * per_shard + k
                key = f"{shard:05d}{k:04d}"
                image, caption = square(i)
                meta = json.dumps({"url": f"http://example.com/{i}.jpg", "caption": caption, "status": "success"})
                for ext, data in (("jpg", image), ("txt", caption.encode()), ("json", meta.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n, "failed": 0}))
        paths.append(path)
    return paths


def write_gnu_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A shard made by GNU ``tar`` from files ``<key>.<ext>`` in a folder (members named ``./key.ext``)."""
    staging = path.parent / f".{path.stem}_files"
    staging.mkdir(parents=True, exist_ok=True)
    for key, files in samples.items():
        for ext, data in files.items():
            (staging / f"{key}.{ext}").write_bytes(data)
    names = sorted(p.name for p in staging.iterdir())  # tar keeps a sample's files together in this order
    subprocess.run(["tar", "-cf", str(path), "-C", str(staging), *names], check=True)
    return path


def gnu_tar_shard(path: Path, count: int, start: int = 0, png: bool = False) -> Path:
    samples = {}
    for i in range(start, start + count):
        image, caption = square(i, fmt="PNG" if png else "JPEG")
        samples[f"g{i:05d}"] = {"png" if png else "jpg": image, "text": caption.encode()}
    return write_gnu_tar(path, samples)

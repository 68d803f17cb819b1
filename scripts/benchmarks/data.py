"""``data``: samples/s of the training loaders (decode + augment + tokenize + collate) for custom folders and
WebDataset shards with N workers, against the same pipeline written with plain PIL + torchvision in one process,
on the same generated JPEGs; then the NaFlex pipeline (``--naflex-patches``: crop, aspect-preserving resize into
the patch budget, patch batches) on the same files, with how much of its batches is padding (padded to each
batch's longest sequence, to the budget, and if batches were grouped by patch count).
"""

from __future__ import annotations

import os
import time

NAME = "data"
HELP = "training loaders (custom, wds) against plain PIL + torchvision, samples/s"


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=1024, help="generated images")
    parser.add_argument("--source-size", type=int, default=384, help="side of the generated JPEGs")
    parser.add_argument("--size", type=int, default=224, help="the model's input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dir", default="/tmp/clip_tao_bench_data", help="where the images and shards are written")
    parser.add_argument("--naflex-patches", type=int, default=256, help="NaFlex patch budget (0: skip the NaFlex runs)")


def _make_images(folder: str, n: int, source_size: int) -> list[str]:
    """``n`` photo-like JPEGs (smooth gradients and noise) with captions, written once and reused."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        paths.append(path)
        if os.path.exists(path):
            continue
        y, x = np.mgrid[0:source_size, 0:source_size] / source_size
        base = np.stack([x * rng.uniform(50, 255), y * rng.uniform(50, 255), (x + y) * rng.uniform(20, 120)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        with open(path[:-4] + ".txt", "w") as f:
            f.write(f"a synthetic photo number {i} with a colour gradient")
    return paths


def _write_shards(folder: str, paths: list[str], per_shard: int) -> None:
    import webdataset

    if os.path.isdir(folder) and os.listdir(folder):
        return
    os.makedirs(folder, exist_ok=True)
    with webdataset.ShardWriter(os.path.join(folder, "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for path in paths:
            with open(path, "rb") as f, open(path[:-4] + ".txt", "rb") as c:
                sink.write({"__key__": os.path.basename(path)[:-4], "jpg": f.read(), "txt": c.read()})


def _rate(batches, n_batches: int, batch: int) -> float:
    """samples/s over ``n_batches`` batches after the first (which pays for worker start-up)."""
    iterator = iter(batches)
    next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(n_batches - 1):
        count += len(next(iterator)["pixels"])
    return count / (time.perf_counter() - start)


def _train_data_config(args, root: str, kind: str, workers: int):
    """The training data section for the generated images (``custom``) or shards (``wds``) under ``root``."""
    from clip_tao.config.schema import DatasetConfig, DatasetEntry, WdsConfig

    cfg = DatasetConfig(seed=0, pin_memory=False)
    cfg.train.type = kind
    cfg.train.batch_size = args.batch
    cfg.train.num_workers = workers
    cfg.train.datasets = [DatasetEntry(os.path.join(root, "images"))]
    cfg.train.wds = WdsConfig(root_dir=os.path.join(root, "shards"), samples_per_shard=args.per_shard)
    return cfg


def _loader_rate(cfg, preprocess, tokenizer, n_batches: int) -> float:
    """Samples/s of clip-tao's training loader for ``cfg`` over at most ``n_batches`` batches."""
    from clip_tao.data.loaders import build_train_loader

    bundle = build_train_loader(cfg, preprocess, tokenizer)
    bundle.set_epoch(0)
    # what training iterates: for shards, the workers' per-step chunks joined into the step's batches
    return _rate(bundle.batches(), min(n_batches, bundle.batches_per_epoch), cfg.train.batch_size)


def bench_data(args) -> dict:
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from clip_tao.config.schema import DatasetConfig
    from clip_tao.data.transforms import build_train_transform
    from clip_tao.data.wds import seeded_transform
    from clip_tao.models import create_model
    from clip_tao.models.base import Preprocess

    torch.set_num_threads(1)
    root = args.dir
    paths = _make_images(os.path.join(root, "images"), args.n, args.source_size)
    _write_shards(os.path.join(root, "shards"), paths, args.per_shard)
    tokenizer = create_model("tiny-clip", pretrained=False).tokenizer
    preprocess = Preprocess(image_size=args.size)
    n_batches = args.n // args.batch

    # The baseline: the same augmentation written directly with PIL + torchvision, one process.
    cfg = DatasetConfig()
    probability, *jitter = cfg.augmentation.color_jitter
    baseline = T.Compose([
        T.RandomResizedCrop(args.size, scale=tuple(cfg.augmentation.scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(*jitter)], p=probability),
        T.RandomGrayscale(p=cfg.augmentation.grayscale),
        T.ToTensor(),
        T.Normalize(preprocess.mean, preprocess.std),
    ])  # fmt: skip
    # clip-tao's transform does the same in fewer operations: the same pixels from the same generator state.
    probe = Image.effect_noise((args.source_size, args.source_size), 64).convert("RGB")
    ours = build_train_transform(preprocess, cfg.augmentation)
    assert torch.equal(seeded_transform(ours, probe, 1), seeded_transform(baseline, probe, 1))

    def plain():
        for start in range(0, len(paths) - args.batch + 1, args.batch):
            images, captions = [], []
            for path in paths[start : start + args.batch]:
                with Image.open(path) as image:
                    images.append(baseline(image.convert("RGB")))
                with open(path[:-4] + ".txt") as f:
                    captions.append(f.read().strip())
            yield {"pixels": torch.stack(images), "input_ids": tokenizer(captions)}

    result = {"benchmark": "data", "images": args.n, "source_size": args.source_size, "size": args.size,
              "batch": args.batch, "baseline_samples_per_s": round(_rate(plain(), n_batches, args.batch), 1)}  # fmt: skip
    for kind in ("custom", "wds"):
        for workers in args.workers:
            rate = _loader_rate(_train_data_config(args, root, kind, workers), preprocess, tokenizer, n_batches)
            result[f"{kind}_{workers}_workers_samples_per_s"] = round(rate, 1)
            result[f"{kind}_{workers}_workers_per_worker_vs_baseline"] = round(
                rate / max(workers, 1) / result["baseline_samples_per_s"], 2
            )
    if args.naflex_patches:
        result["naflex"] = _bench_naflex_data(args, root, tokenizer, n_batches, result)
    return result


def _transform_ms(preprocess, root: str, count: int = 64) -> float:
    """Milliseconds a sample of the training transform (defaults of ``dataset.augmentation``), after a warm-up."""
    import glob

    from PIL import Image

    from clip_tao.config.schema import AugmentationConfig
    from clip_tao.data.transforms import build_train_transform

    transform = build_train_transform(preprocess, AugmentationConfig())
    images = []
    for path in sorted(glob.glob(os.path.join(root, "images", "*.jpg")))[:count]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    for image in images[:8]:
        transform(image)
    start = time.perf_counter()
    for image in images:
        transform(image)
    return round((time.perf_counter() - start) / len(images) * 1e3, 2)


def _bench_naflex_data(args, root: str, tokenizer, n_batches: int, fixed: dict) -> dict:
    """The NaFlex training loaders on the same files: samples/s, and the share of patch slots that is padding."""
    from clip_tao.data.loaders import build_train_loader
    from clip_tao.models.base import Preprocess

    budget = args.naflex_patches
    preprocess = Preprocess(args.size, (0.5,) * 3, (0.5,) * 3, "bilinear", "squash", patch_size=16,
                            max_num_patches=budget)  # fmt: skip
    out: dict = {"max_num_patches": budget, "patch_size": 16}
    # The per-sample transforms alone, in this process (the loader figures also carry worker scheduling noise).
    out["transform_ms_a_sample"] = {
        "fixed_size": _transform_ms(Preprocess(image_size=args.size), root),
        "naflex": _transform_ms(preprocess, root),
    }
    for kind in ("custom", "wds"):
        for workers in args.workers:
            rate = _loader_rate(_train_data_config(args, root, kind, workers), preprocess, tokenizer, n_batches)
            out[f"{kind}_{workers}_workers_samples_per_s"] = round(rate, 1)
            out[f"{kind}_{workers}_workers_per_worker"] = round(rate / max(workers, 1), 1)
            out[f"{kind}_{workers}_workers_vs_fixed_size"] = round(
                rate / fixed[f"{kind}_{workers}_workers_samples_per_s"], 2
            )
    # Padding, over one epoch of the custom loader: what each sample really has, and what its batch pads to.
    counts, padded = [], 0
    cfg = _train_data_config(args, root, "custom", max(args.workers))
    bundle = build_train_loader(cfg, preprocess, tokenizer)
    bundle.set_epoch(0)
    for batch in bundle.batches():
        real = batch["pixels"].pixel_attention_mask.sum(1).tolist()
        counts += real
        padded += len(real) * batch["pixels"].num_patches
    total = sum(counts)
    grouped = 0  # batches cut from samples sorted by patch count, within windows of 16 batches
    window = 16 * args.batch
    for start in range(0, len(counts), window):
        ordered = sorted(counts[start : start + window])
        for b in range(0, len(ordered), args.batch):
            chunk = ordered[b : b + args.batch]
            grouped += len(chunk) * max(chunk)
    out.update({
        "mean_patches_a_sample": round(total / len(counts), 1),
        "min_patches_a_sample": min(counts),
        "padding_to_batch_longest": round(1 - total / padded, 4),
        "padding_to_budget": round(1 - total / (len(counts) * budget), 4),
        "padding_if_grouped_by_patch_count": round(1 - total / grouped, 4),
    })  # fmt: skip
    return out


run = bench_data

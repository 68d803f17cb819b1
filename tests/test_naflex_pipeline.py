"""NaFlex end to end on images of mixed aspect ratios: augmentation before the processor's resize, training
on custom folders and shards with exact resumption (also two gloo processes), evaluation at another budget
checked against transformers' processor + ``Siglip2Model``, zero-shot classification and inference."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from clip_tao.cli import main
from clip_tao.config.schema import AugmentationConfig
from clip_tao.data.wds import open_rgb, seeded_transform
from clip_tao.models.base import Preprocess
from tests.conftest import COLORS, write_spec
from tests.family_assets import make_gemma_tokenizer, make_naflex_folder

TYPE = "siglip2-so400m-patch16-naflex"
SHAPES = [(96, 32), (32, 96), (64, 64), (120, 24), (48, 80), (40, 56)]  # (width, height)


def blob(seed: int) -> tuple[Image.Image, str]:
    """A coloured ellipse on a background, in one of several aspect ratios, and its caption."""
    rng = random.Random(seed)
    width, height = rng.choice(SHAPES)
    color, background = rng.sample(sorted(COLORS), 2)
    image = Image.new("RGB", (width, height), COLORS[background])
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=COLORS[color])
    return image, f"a {color} blob on {background}"


def make_blobs(root: Path, count: int, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, caption = blob(seed * 1000 + i)
        image.save(root / f"img_{i:03d}.jpg")
        (root / f"img_{i:03d}.txt").write_text(caption, encoding="utf-8")
    return root


def write_blob_shards(folder: Path, count: int, per_shard: int) -> Path:
    import io

    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            image, caption = blob(i)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG")
            sink.write({"__key__": f"{i:06d}", "jpg": buffer.getvalue(), "txt": caption})
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("naflex_model")
    make_gemma_tokenizer(root / "gemma")
    return make_naflex_folder(root / "model", root / "gemma")


def naflex_spec(tmp_path: Path, model_folder: Path, train: dict | None = None, data: dict | None = None) -> Path:
    train_dir = tmp_path / "data" / "train"
    val_dir = tmp_path / "data" / "val"
    if not train_dir.exists():
        make_blobs(train_dir, 24, seed=1)
        make_blobs(val_dir, 8, seed=2)
    spec = {
        "results_dir": str(tmp_path / "results"),
        "model": {"type": TYPE, "pretrained_path": str(model_folder), "max_num_patches": 24},
        "dataset": {
            "train": data or {"batch_size": 6, "num_workers": 2, "datasets": [{"image_dir": str(train_dir)}]},
            "val": {"batch_size": 4, "num_workers": 0, "datasets": [{"image_dir": str(val_dir)}]},
        },
        "train": {"num_epochs": 2, "precision": "fp32", "optim": {"warmup_steps": 1}, **(train or {})},
        "evaluate": {"num_workers": 0, "batch_size": 4},
        "inference": {"num_workers": 0, "batch_size": 4},
    }
    return write_spec(tmp_path / "spec.yaml", spec)


def test_augmentation_crops_then_resizes_as_the_processor(tmp_path):
    """With colour augmentation off, a training sample is exactly: torchvision's random resized crop of the
    source (any aspect within [3/4, 4/3]), then ``Siglip2ImageProcessor`` on that crop."""
    from torchvision import transforms as T
    from transformers import Siglip2ImageProcessor

    from clip_tao.data.transforms import build_train_transform

    preprocess = Preprocess(256, (0.5,) * 3, (0.5,) * 3, "bilinear", "squash", patch_size=16, max_num_patches=64)
    transform = build_train_transform(
        preprocess, AugmentationConfig(scale=[0.3, 1.0], color_jitter=[0, 0, 0, 0, 0], grayscale=0)
    )
    processor = Siglip2ImageProcessor(max_num_patches=64)
    source, _ = blob(3)
    source = source.resize((200, 90))
    grids = set()
    for seed in range(6):
        ours = seeded_transform(transform, source, seed)
        torch.manual_seed(seed)
        top, left, height, width = T.RandomResizedCrop.get_params(source, [0.3, 1.0], [3 / 4, 4 / 3])
        crop = source.crop((left, top, left + width, top + height))
        want = processor(crop, return_tensors="pt")
        rows, cols = want["spatial_shapes"][0].tolist()
        assert ours.shape == (3, rows * 16, cols * 16)
        patches = ours.reshape(3, rows, 16, cols, 16).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)
        assert torch.equal(patches, want["pixel_values"][0, : rows * cols])
        grids.add((rows, cols))
        assert torch.equal(seeded_transform(transform, source, seed), ours)  # a function of the seed
    assert len(grids) >= 2  # the crop's aspect ratio, not a square, decides the grid


def _siglip2_with_checkpoint(model_folder: Path, checkpoint: Path):
    from transformers import Siglip2Model

    reference = Siglip2Model.from_pretrained(str(model_folder)).eval()
    state = torch.load(checkpoint, weights_only=True)["model"]
    reference.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return reference


def test_train_evaluate_classify_and_embed_at_native_aspect_ratio(tmp_path, model_folder):
    from transformers import Siglip2ImageProcessor

    from clip_tao import metrics

    spec = naflex_spec(tmp_path, model_folder, train={"num_epochs": 1})
    assert main(["train", "-e", str(spec)]) == 0
    checkpoint = tmp_path / "results" / "train" / "clip_latest.pth"
    val = tmp_path / "data" / "val"
    # Evaluation with a budget of 40 patches where training used 24: the positions are resized per image.
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={checkpoint}", "model.max_num_patches=40"]) == 0
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    reference = _siglip2_with_checkpoint(model_folder, checkpoint)
    images = [open_rgb(str(p)) for p in sorted(val.glob("*.jpg"))]
    captions = [p.read_text() for p in sorted(val.glob("*.txt"))]
    from clip_tao.models import create_model

    tokenizer = create_model(TYPE, pretrained_path=str(model_folder)).tokenizer
    with torch.no_grad():
        inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=40)(images, return_tensors="pt")
        image_emb = reference.get_image_features(**inputs)
        text_emb = reference.get_text_features(input_ids=tokenizer(captions))
    normalise = torch.nn.functional.normalize
    want = metrics.retrieval_metrics(normalise(getattr(image_emb, "pooler_output", image_emb), dim=-1),
                                     normalise(getattr(text_emb, "pooler_output", text_emb), dim=-1))  # fmt: skip
    for key in ("i2t_R@1", "i2t_mAP", "t2i_R@5", "t2i_mAP", "t2i_MeanR"):
        assert results[key] == pytest.approx(want[key], abs=1e-4), key

    # Zero-shot classification over a folder per class of mixed shapes.
    tree = tmp_path / "classes"
    for i in range(9):
        image, caption = blob(500 + i)
        color = caption.split()[1]
        (tree / color).mkdir(parents=True, exist_ok=True)
        image.save(tree / color / f"{i}.jpg")
    args = [
        "evaluate.mode=classification",
        f"evaluate.datasets=[{{image_dir: {tree}}}]",
        f"evaluate.checkpoint={checkpoint}",
    ]
    assert main(["evaluate", "-e", str(spec), *args]) == 0
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    assert results["num_images"] == 9

    # Inference: embeddings of every image, equal to Siglip2Model's on the processor's output at budget 24.
    import h5py

    args = [f"inference.checkpoint={checkpoint}", f"inference.datasets=[{{image_dir: {val}}}]"]
    assert main(["inference", "-e", str(spec), *args]) == 0
    with h5py.File(tmp_path / "results" / "inference" / "image_embeddings.h5") as f:
        name = next(k for k in f if f[k].ndim == 2)
        stored = torch.from_numpy(f[name][()])
    with torch.no_grad():
        inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=24)(images, return_tensors="pt")
        want = normalise(getattr(e := reference.get_image_features(**inputs), "pooler_output", e), dim=-1)
    torch.testing.assert_close(stored, want, atol=1e-5, rtol=1e-5)

    # Search: a text query ranks the images by Siglip2Model's similarities; an image query finds itself.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red blob on green\n", encoding="utf-8")
    query = sorted(val.glob("*.jpg"))[2]
    search = [*args, "inference.mode=search", f"inference.text_file={prompts}", f"inference.query_images=[{query}]"]
    assert main(["inference", "-e", str(spec), *search]) == 0
    found = json.loads((tmp_path / "results" / "inference" / "search_results.json").read_text())["queries"]
    with torch.no_grad():
        text = reference.get_text_features(input_ids=tokenizer(["a red blob on green"]))
        scores = (normalise(getattr(text, "pooler_output", text), dim=-1) @ want.T)[0]
    paths = sorted(val.glob("*.jpg"))
    assert [r["image_path"] for r in found[0]["results"]] == [
        str(paths[i]) for i in scores.argsort(descending=True)[:5]
    ]
    assert found[0]["results"][0]["score"] == pytest.approx(scores.max().item(), abs=1e-5)
    assert found[1]["results"][0]["image_path"] == str(query) and found[1]["results"][0]["score"] == pytest.approx(1.0)


def _keys_and_weights(run: Path):
    state = torch.load(run / "clip_latest.pth", weights_only=True)["model"]
    return state


@pytest.mark.parametrize("kind", ["custom", "wds"])
def test_resumed_naflex_run_trains_on_exactly_the_same_samples(tmp_path, model_folder, kind):
    data = None
    if kind == "wds":
        write_blob_shards(tmp_path / "shards", 24, per_shard=6)  # 4 shards, 2 workers
        data = {"type": "wds", "batch_size": 4, "num_workers": 2,
                "wds": {"root_dir": str(tmp_path / "shards"), "samples_per_shard": 6}}  # fmt: skip
    train = {
        "checkpoint_interval_unit": "step",
        "checkpoint_interval": 3,
        "sample_log": str(tmp_path / "straight.keys"),
    }
    spec = naflex_spec(tmp_path, model_folder, train=train, data=data)
    assert main(["train", "-e", str(spec)]) == 0
    straight = tmp_path / "results" / "train"
    middle = sorted(straight.glob("model_epoch_000_step_*.pth"))[0]
    saved = torch.load(middle, weights_only=True)
    assert saved["epoch"] == 0 and saved["batches_in_epoch"] > 0
    lines = (tmp_path / "straight.keys").read_text().splitlines()
    done = [line for line in lines if int(line.split()[0]) <= saved["global_step"]]
    resumed_log = tmp_path / "resumed.keys"
    resumed_log.write_text("\n".join(done) + "\n")
    args = [f"results_dir={tmp_path / 'resumed'}", f"train.resume_training_checkpoint_path={middle}",
            f"train.sample_log={resumed_log}"]  # fmt: skip
    assert main(["train", "-e", str(spec), *args]) == 0
    assert resumed_log.read_text().splitlines() == lines
    a, b = _keys_and_weights(straight), _keys_and_weights(tmp_path / "resumed" / "train")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_naflex_training(tmp_path, model_folder, strategy):
    """Patch batches through DDP and FSDP (whose sharding must leave SigLIP's shape-[1] logit scale whole)."""
    from tests.test_distributed import torchrun

    write_blob_shards(tmp_path / "shards", 16, per_shard=4)  # 4 shards: 2 ranks x 2 workers
    data = {"type": "wds", "batch_size": 2, "num_workers": 2,
            "wds": {"root_dir": str(tmp_path / "shards"), "samples_per_shard": 4}}  # fmt: skip
    train = {"num_epochs": 1, "distributed_strategy": strategy, "sample_log": str(tmp_path / "keys")}
    spec = naflex_spec(tmp_path, model_folder, train=train, data=data)
    torchrun("-m", "clip_tao", "train", "-e", str(spec))
    # FSDP writes sharded folders (every rank its shard) with the plain data in train_state.pth
    suffix = ".dcp" if strategy == "fsdp" else ".pth"
    latest = tmp_path / "results" / "train" / f"clip_latest{suffix}"
    latest = torch.load(latest / "train_state.pth" if strategy == "fsdp" else latest, weights_only=True)
    # 16 samples / (2 ranks x 2 workers) / batch 2 = 2 batches a worker, 4 steps a rank
    assert latest["world_size"] == 2 and latest["global_step"] == 4
    ranks = [(tmp_path / "keys").read_text().split()[1::2], (tmp_path / "keys.rank1").read_text().split()[1::2]]
    assert len(ranks[0]) == len(ranks[1]) == 8 and not set(ranks[0]) & set(ranks[1])
    assert os.path.exists(tmp_path / "results" / "train" / f"clip_best{suffix}")
    if strategy == "fsdp":  # the sharded folder holds the shape-[1] logit scale whole (read in one process)
        from clip_tao.engine.checkpoint import load_checkpoint

        weights = load_checkpoint(str(tmp_path / "results" / "train" / "clip_latest.dcp"))["model"]
        scales = [weight for name, weight in weights.items() if "logit_scale" in name]
        assert scales and all(scale.shape == (1,) for scale in scales)


def test_patch_budget_on_the_command_line_is_checked(tmp_path, model_folder, capsys):
    spec = naflex_spec(tmp_path, model_folder)
    assert main(["evaluate", "-e", str(spec), "model.max_num_patches=0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "model.max_num_patches=0 must be an integer in [1, 1024]" in err[-1]
    data = yaml.safe_load(spec.read_text())
    assert data["model"]["max_num_patches"] == 24


def test_an_image_too_long_for_the_budget_is_skipped_and_counted(tmp_path, caplog):
    """At its smallest scale a 1 x 9,000,000 px line still has 2 patches of 8 px: over a budget of 1."""
    from clip_tao.config.schema import DatasetEntry
    from clip_tao.data.loaders import build_eval_loader

    root = make_blobs(tmp_path / "d", 2, seed=3)
    Image.new("RGB", (9_000_000, 1), (200, 10, 10)).save(root / "line.png")
    (root / "line.txt").write_text("a very long red line", encoding="utf-8")
    preprocess = Preprocess(64, (0.5,) * 3, (0.5,) * 3, "bilinear", "squash", patch_size=8, max_num_patches=1)
    tokenizer = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731 - captions are not under test
    bundle = build_eval_loader([DatasetEntry(str(root))], "evaluate.datasets", preprocess, tokenizer, 8, 0)
    (batch,) = list(bundle.loader)
    assert batch["skipped"] == {"too_thin_for_patch_budget": 1} and len(batch["pixels"]) == 2
    assert "too elongated for max_num_patches=1" in caplog.text and "line.png" in caplog.text

import pytest
import torch
from PIL import Image

from clip_tao.config.schema import AugmentationConfig, DatasetConfig, DatasetEntry
from clip_tao.data.custom import scan_custom_datasets
from clip_tao.data.loaders import EpochShuffleSampler, build_eval_loader, build_train_loader
from clip_tao.data.transforms import build_eval_transform, build_train_transform
from clip_tao.errors import ConfigError, DataError
from clip_tao.models import create_model
from clip_tao.models.base import Preprocess
from tests.conftest import make_dataset


def _write(path, content: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)


def _image(path, color=(255, 0, 0), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path, format=fmt)


def test_recursive_scan_pairs_by_relative_path(tmp_path):
    images, captions = tmp_path / "img", tmp_path / "cap"
    _image(images / "a" / "x.jpg")
    _image(images / "b" / "x.png")  # same file name, other folder: must not collide
    _image(images / "c.webp", fmt="WEBP")
    _image(images / "d.bmp", fmt="BMP")
    _write(images / "notes.md", "not an image")
    _write(captions / "a" / "x.txt", "  first caption\n")
    _write(captions / "b" / "x.txt", "second caption")
    _write(captions / "c.txt", "\ufeffthird caption")  # a BOM is allowed
    _write(captions / "d.txt", "fourth")
    samples, skipped = scan_custom_datasets([DatasetEntry(str(images), str(captions))], "dataset.train.datasets")
    got = {s.key: s.caption for s in samples}
    assert got == {
        "0/a/x.jpg": "first caption",
        "0/b/x.png": "second caption",
        "0/c.webp": "third caption",
        "0/d.bmp": "fourth",
    }
    assert not skipped


def test_several_entries_concatenate_with_suffix_and_list_file(tmp_path):
    one = make_dataset(tmp_path / "one", 3)
    two = tmp_path / "two"
    _image(two / "p.jpg")
    _image(two / "q.jpg")
    _write(two / "p.caption", "p caption")
    _write(two / "q.caption", "q caption")
    listing = tmp_path / "list.txt"
    listing.write_text("q.jpg\n\n")
    entries = [
        DatasetEntry(str(one)),
        DatasetEntry(str(two), caption_file_suffix=".caption", image_list_file=str(listing)),
    ]
    samples, _ = scan_custom_datasets(entries, "dataset.train.datasets")
    assert [s.key for s in samples] == ["0/img_000.jpg", "0/img_001.jpg", "0/img_002.jpg", "1/q.jpg"]
    assert samples[-1].caption == "q caption"


def test_bad_files_are_skipped_and_counted(tmp_path):
    root = make_dataset(tmp_path / "d", 6)
    (root / "img_000.txt").unlink()  # image without caption
    _write(root / "img_001.txt", "   \n")  # empty caption
    _write(root / "img_002.txt", b"\xff\xfe caf\xe9")  # not UTF-8
    _write(root / "img_003.jpg", b"this is not a jpeg")  # undecodable image
    samples, skipped = scan_custom_datasets([DatasetEntry(str(root))], "dataset.train.datasets")
    assert skipped == {"missing_caption": 1, "empty_caption": 1, "caption_not_utf8": 1}
    assert len(samples) == 3
    model = create_model("tiny-clip", pretrained=False)
    bundle = build_eval_loader([DatasetEntry(str(root))], "evaluate.datasets", model.preprocess, model.tokenizer, 8, 0)
    batches = list(bundle.loader)
    assert sum(b["skipped"]["undecodable_image"] for b in batches) == 1
    assert sum(len(b["indices"]) for b in batches) == 2
    assert batches[0]["pixels"].shape == (2, 3, 64, 64) and batches[0]["input_ids"].shape == (2, 77)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (DatasetEntry(""), r"dataset.train.datasets\[0\].image_dir is required"),
        (DatasetEntry("/no/such/dir"), r"dataset.train.datasets\[0\].image_dir '/no/such/dir' does not exist"),
    ],
)
def test_missing_folders_fail_up_front(entry, message):
    with pytest.raises(DataError, match=message):
        scan_custom_datasets([entry], "dataset.train.datasets")


def test_empty_dataset_fails_up_front(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no usable image-caption pairs"):
        scan_custom_datasets([DatasetEntry(str(tmp_path / "empty"))], "dataset.train.datasets")
    with pytest.raises(DataError, match="dataset.val.datasets is empty"):
        scan_custom_datasets([], "dataset.val.datasets")
    with pytest.raises(DataError, match="image_list_file"):
        scan_custom_datasets([DatasetEntry(str(tmp_path / "empty"), image_list_file=str(tmp_path / "x"))], "s")


def test_transforms_follow_model_and_augmentation():
    preprocess = Preprocess(image_size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = Image.new("RGB", (100, 60), (255, 255, 255))
    assert build_eval_transform(preprocess)(image).shape == (3, 48, 48)
    # squash (SigLIP's processor) keeps the whole image: a stripe at the far left survives, a crop would cut it.
    striped = Image.new("RGB", (100, 60), (255, 255, 255))
    striped.paste((0, 0, 0), (0, 0, 10, 60))
    squashed = build_eval_transform(Preprocess(48, (0.5,) * 3, (0.5,) * 3, "bilinear", "squash"))(striped)
    cropped = build_eval_transform(preprocess)(striped)
    assert squashed.shape == (3, 48, 48) and squashed[:, :, 0].mean() < -0.9 and cropped[:, :, 0].mean() > 0.9
    aug = AugmentationConfig(scale=[0.5, 1.0], color_jitter=[1.0, 0.4, 0.4, 0.4, 0.1], grayscale=1.0)
    out = build_train_transform(preprocess, aug)(Image.new("RGB", (100, 60), (255, 0, 0)))
    assert out.shape == (3, 48, 48)
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])  # grayscale with p=1
    with pytest.raises(ConfigError, match="dataset.augmentation.scale"):
        build_train_transform(preprocess, AugmentationConfig(scale=[0.9, 0.1]))
    with pytest.raises(ConfigError, match="must have 5 numbers"):
        build_train_transform(preprocess, AugmentationConfig(color_jitter=[0.8, 0.3]))


def _torchvision_train_transform(preprocess: Preprocess, aug: AugmentationConfig):
    """The training augmentation as torchvision's own transforms, one step each."""
    from torchvision import transforms as T

    probability, *jitter = aug.color_jitter
    interpolation = T.InterpolationMode[preprocess.interpolation.upper()]
    return T.Compose([
        T.RandomResizedCrop(preprocess.image_size, scale=tuple(aug.scale), interpolation=interpolation),
        T.RandomApply([T.ColorJitter(*jitter)], p=probability),
        T.RandomGrayscale(p=aug.grayscale),
        T.ToTensor(),
        T.Normalize(preprocess.mean, preprocess.std),
    ])  # fmt: skip


@pytest.mark.parametrize(
    "aug",
    [
        AugmentationConfig(),  # TAO's defaults: every step active
        AugmentationConfig(scale=[0.8, 1.0], color_jitter=[0.0] * 5, grayscale=0.0),  # the quickstart's
        AugmentationConfig(color_jitter=[0.0] * 5, grayscale=0.5),  # jitter inert, grayscale after it drawn
        AugmentationConfig(color_jitter=[0.5, 0.3, 0.0, 0.0, 0.0], grayscale=0.0),
        AugmentationConfig(scale=[0.02, 0.05]),  # tiny crops of strips: torchvision's centre-box fallback
    ],
)
def test_training_transform_gives_torchvisions_pixels_to_the_bit(aug):
    """Fewer operations a sample, the same result: torchvision's pipeline from the same generator state."""
    from clip_tao.data.wds import seeded_transform

    noise = Image.effect_noise((97, 61), 80).convert("RGB")
    images = [noise, noise.resize((300, 7)), noise.resize((7, 300)), noise.convert("L"), Image.new("RGB", (40, 40))]
    for preprocess in (Preprocess(64), Preprocess(48, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear")):
        ours, theirs = build_train_transform(preprocess, aug), _torchvision_train_transform(preprocess, aug)
        for i, image in enumerate(images):
            image = image.convert("RGB") if i == 3 else image
            for seed in range(8):
                expected = seeded_transform(theirs, image, 1000 * i + seed)
                assert torch.equal(seeded_transform(ours, image, 1000 * i + seed), expected), (aug, i, seed)


def test_normalized_tensor_is_to_tensor_then_normalize_for_every_level():
    from torchvision import transforms as T

    from clip_tao.data.transforms import NormalizedTensor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    levels = torch.arange(256 * 3, dtype=torch.int64).remainder(256).to(torch.uint8)
    every_level = Image.frombytes("RGB", (16, 16), levels[torch.randperm(768)].numpy().tobytes())
    assert torch.equal(NormalizedTensor(mean, std)(every_level), reference(every_level))
    assert torch.equal(
        NormalizedTensor(mean, std)(every_level.crop((1, 2, 12, 9))), reference(every_level.crop((1, 2, 12, 9)))
    )


def test_epoch_order_is_deterministic_and_resumable():
    sampler = EpochShuffleSampler(10, seed=5)
    sampler.set_epoch(3)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    assert list(sampler) == order
    sampler.set_epoch(4)
    assert list(sampler) != order
    sampler.set_epoch(3)
    sampler.start_index = 4
    assert list(sampler) == order[4:] and len(sampler) == 6


def test_train_loader_batches(tmp_path):
    root = make_dataset(tmp_path / "d", 20)
    model = create_model("tiny-siglip2", pretrained=False)
    cfg = DatasetConfig()
    cfg.train.datasets = [DatasetEntry(str(root))]
    cfg.train.batch_size = 8
    cfg.train.num_workers = 2
    bundle = build_train_loader(cfg, model.preprocess, model.tokenizer)
    bundle.set_epoch(0)
    batches = list(bundle.loader)
    assert len(batches) == 2  # drop_last: 20 // 8
    assert batches[0]["pixels"].shape == (8, 3, 64, 64) and batches[0]["input_ids"].shape == (8, 64)
    bundle.set_epoch(0)
    assert torch.equal(next(iter(bundle.loader))["pixels"], batches[0]["pixels"])  # same augmentation per epoch


def test_training_draws_every_caption_of_a_multi_caption_image(tmp_path):
    from clip_tao.data.loaders import ImageTextDataset

    root = tmp_path / "d"
    _image(root / "a.jpg")
    _write(root / "a.txt", "first\nsecond\n\nthird\n")
    samples, _ = scan_custom_datasets([DatasetEntry(str(root), multi_caption=True)], "dataset.train.datasets")
    assert samples[0].captions == ("first", "second", "third")
    drawn = {ImageTextDataset._caption(samples[0], seed) for seed in range(30)}
    assert drawn == {"first", "second", "third"}
    assert ImageTextDataset._caption(samples[0], None) == "first"  # evaluation: the first caption


def test_cached_tokenizer_gives_the_tokenizers_ids_for_twins_and_hostile_captions():
    from clip_tao.data.token_cache import CachedTokenizer

    tokenizer = create_model("tiny-clip", pretrained=False).tokenizer
    cached = CachedTokenizer(tokenizer, max_captions=3)
    hostile = ["a red square", "a red square", "", "  ", "&amp; caf\u00e9 \u202e\U0001f600", "x" * 5000, "a red square"]
    for texts in (hostile, hostile[::-1], ["new one", "another", "a red square"], []):  # repeats, then past the cap
        expected = tokenizer(texts)
        got = cached(texts)
        assert got.dtype == expected.dtype and torch.equal(got, expected), texts
    assert len(cached.rows) == 3  # the cap holds
    assert torch.equal(cached("a red square"), tokenizer("a red square"))  # one text, as tokenizers take it

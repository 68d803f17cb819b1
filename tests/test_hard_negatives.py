"""Hard negatives and duplicate pairs: the losses against open_clip and against explicit loops over pairs,
and the data that feeds them (negative files, neg.txt members, seeded draws)."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip_tao.losses import ContrastiveLoss
from clip_tao.pair_losses import PAD, PairContrastiveLoss, PairInfo, text_id


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _info(captions, caption_sets, images, negatives, k):
    """PairInfo from plain strings: ``negatives[i]`` the filled slots of sample i (at most k)."""
    width = max(len(s) for s in caption_sets)
    sets = torch.full((len(captions), width), PAD)
    slots = torch.full((len(captions), k), PAD)
    for i, own in enumerate(caption_sets):
        for c, text in enumerate(own):
            sets[i, c] = text_id(text)
        for c, text in enumerate(negatives[i]):
            slots[i, c] = text_id(text)
    return PairInfo(
        torch.tensor([text_id(c) for c in captions]), sets, torch.tensor([text_id(x) for x in images]), slots
    )


# A batch with the twins real data has: sample 2 repeats sample 0's caption, sample 3 is sample 1's image
# file again, sample 4's caption is another caption of multi-caption image 5; sample 1 has no negative and
# sample 0's second negative is sample 1's own caption.
CAPTIONS = ["a red circle", "a blue square", "a red circle", "a green star", "two cats", "a cat pair"]
SETS = [["a red circle"], ["a blue square"], ["a red circle"], ["a green star"], ["two cats"],
        ["a cat pair", "two cats"]]  # fmt: skip
IMAGES = ["img0", "img1", "img2", "img1", "img4", "img5"]
NEGATIVES = [["a blue circle", "a blue square"], [], ["a circle red"], ["a red star", "a star"], ["one cat"],
             ["a dog pair", "two dogs"]]  # fmt: skip
K = 2


def _duplicate(i, j):
    """Written out: caption j is one of image i's captions, or the images are the same file."""
    return i != j and (CAPTIONS[j] in SETS[i] or IMAGES[i] == IMAGES[j])


def _embeddings(n=6, d=5):
    image, text = _unit(n, d, 1), _unit(n, d, 2)
    negatives = _unit(n * K, d, 3)
    return image, text, negatives


def _neg(i, k, negatives):
    return negatives[i * K + k]


def _loop_clip(image, text, negatives, scale, mode):
    """NegCLIP by loops: image rows see every caption and every filled hard negative; text rows see images."""
    n = len(image)

    def row_loss(scores: dict, positives: list):
        logz = math.log(sum(math.exp(v) for v in scores.values()))
        return -sum(scores[p] - logz for p in positives) / len(positives)

    i2t = 0.0
    for i in range(n):
        scores, positives = {}, [("t", i)]
        for j in range(n):
            if j != i and _duplicate(i, j):
                if mode == "ignore":
                    continue
                if mode == "positive":
                    positives.append(("t", j))
            scores[("t", j)] = scale * float(image[i] @ text[j])
        for owner in range(n):
            for k, neg_text in enumerate(NEGATIVES[owner]):
                if mode != "negative" and neg_text in SETS[i]:
                    continue  # one of the image's own captions is no negative
                scores[("n", owner, k)] = scale * float(image[i] @ _neg(owner, k, negatives))
        i2t += row_loss(scores, positives)
    t2i = 0.0
    for j in range(n):
        scores, positives = {}, [i for i in [j]]
        for i in range(n):
            if i != j and _duplicate(i, j):
                if mode == "ignore":
                    continue
                if mode == "positive":
                    positives.append(i)
            scores[i] = scale * float(image[i] @ text[j])
        t2i += row_loss(scores, positives)
    return (i2t / n + t2i / n) / 2


def _loop_siglip(image, text, negatives, scale, bias, mode):
    n = len(image)

    def logsig(x):
        return -math.log1p(math.exp(-x))

    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1 if i == j else -1
            if i != j and _duplicate(i, j):
                if mode == "ignore":
                    continue
                if mode == "positive":
                    label = 1
            total -= logsig(label * (scale * float(image[i] @ text[j]) + bias))
        for k in range(len(NEGATIVES[i])):  # only the image's own negatives
            total -= logsig(-(scale * float(image[i] @ _neg(i, k, negatives)) + bias))
    return total / n


def _zero_empty_slots(negatives):
    out = negatives.clone()
    for i, own in enumerate(NEGATIVES):
        out[i * K + len(own) : (i + 1) * K] = 0  # what the step puts in an empty slot
    return out


@pytest.mark.parametrize("mode", ["negative", "ignore", "positive"])
@pytest.mark.parametrize("loss_type", ["clip", "siglip"])
def test_pair_losses_equal_explicit_loops(loss_type, mode):
    image, text, negatives = _embeddings()
    negatives = _zero_empty_slots(negatives)
    info = _info(CAPTIONS, SETS, IMAGES, NEGATIVES, K)
    scale, bias = 4.0, -2.0
    loss = ContrastiveLoss(loss_type, duplicate_pairs=mode)
    got = loss(image, text, torch.tensor(math.log(scale)), torch.tensor(bias), negatives=negatives, info=info)
    if loss_type == "clip":
        want = _loop_clip(image, text, negatives, scale, mode)
    else:
        want = _loop_siglip(image, text, negatives, scale, bias, mode)
    assert abs(float(got) - want) < 1e-9
    # the hard negatives and the duplicate handling each change the loss: neither is a no-op
    plain = loss(image, text, torch.tensor(math.log(scale)), torch.tensor(bias), info=_info(CAPTIONS, SETS, IMAGES,
                                                                                            [[]] * 6, 0))  # fmt: skip
    assert abs(float(plain) - want) > 1e-3
    if mode != "negative":
        other = ContrastiveLoss(loss_type)(image, text, torch.tensor(math.log(scale)), torch.tensor(bias),
                                           negatives=negatives, info=info)  # fmt: skip
        assert abs(float(other) - want) > 1e-3


@pytest.mark.parametrize("loss_type", ["clip", "siglip"])
def test_without_negatives_or_twins_the_pair_loss_is_open_clips(loss_type):
    from open_clip.loss import ClipLoss, SigLipLoss

    image, text = _unit(7, 6, 5), _unit(7, 6, 6)
    info = _info([f"c{i}" for i in range(7)], [[f"c{i}"] for i in range(7)], [f"i{i}" for i in range(7)],
                 [[]] * 7, 3)  # fmt: skip
    negatives = torch.zeros(21, 6, dtype=torch.float64)  # every slot empty
    for mode in ("negative", "ignore", "positive"):
        got = PairContrastiveLoss(loss_type, mode)(image, text, torch.tensor(math.log(3.0)), torch.tensor(-1.0),
                                                   negatives, info)  # fmt: skip
        upstream = ClipLoss()(image, text, 3.0) if loss_type == "clip" else SigLipLoss()(image, text, 3.0, -1.0)
        torch.testing.assert_close(got, upstream, rtol=0, atol=1e-12)


def test_gradients_reach_the_hard_negatives():
    image, text, negatives = _embeddings()
    negatives = _zero_empty_slots(negatives).requires_grad_(True)
    info = _info(CAPTIONS, SETS, IMAGES, NEGATIVES, K)
    for loss_type in ("clip", "siglip"):
        negatives.grad = None
        ContrastiveLoss(loss_type)(image, text, torch.tensor(1.0), torch.tensor(-1.0), negatives, info).backward()
        grad = negatives.grad.reshape(6, K, -1).abs().sum(-1)
        filled = info.negative_valid
        assert (grad[filled] > 0).all() and (grad[~filled] == 0).all(), loss_type


# -- data: negative files, neg.txt members, seeded draws ------------------------------------------------
def _image(path, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)


def _folder_with_negatives(tmp_path):
    """Images in a sub-folder, captions with suffix .cap, and negative files good, bad and missing."""
    images, captions, negatives = tmp_path / "img", tmp_path / "cap", tmp_path / "neg"
    names = ["a", "b", "c", "d", "e", "f"]
    for i, name in enumerate(names):
        _image(images / "sub" / f"{name}.jpg", (40 * i, 80, 200 - 30 * i))
        (captions / "sub").mkdir(parents=True, exist_ok=True)
        (captions / "sub" / f"{name}.cap").write_text(f"caption {name}", encoding="utf-8")
    (negatives / "sub").mkdir(parents=True)
    (negatives / "sub" / "a.cap").write_bytes("\ufeffnegative a one\n\n  negative a two  \nnegative a three\n".encode())
    (negatives / "sub" / "b.cap").write_bytes(b"caf\xe9 au lait")  # Latin-1: skipped and counted
    (negatives / "sub" / "c.cap").write_text("  \n\n", encoding="utf-8")  # empty: skipped and counted
    (negatives / "sub" / "e.cap").write_text("only one ünïcode negative", encoding="utf-8")
    (negatives / "sub" / "f.cap").write_text("f one\nf two", encoding="utf-8")
    # d has no negative file: no negatives, not a problem
    from clip_tao.config.schema import DatasetEntry

    entry = DatasetEntry(str(images), caption_dir=str(captions), caption_file_suffix=".cap",
                         negative_caption_dir=str(negatives))  # fmt: skip
    return entry


def test_negative_files_are_read_and_bad_ones_skipped_and_counted(tmp_path):
    from clip_tao.data.custom import scan_custom_datasets

    samples, skipped = scan_custom_datasets([_folder_with_negatives(tmp_path)], "dataset.train.datasets")
    by_name = {s.key.rsplit("/", 1)[-1]: s for s in samples}
    assert len(samples) == 6  # a bad negative file never costs the sample
    assert by_name["a.jpg"].negative_captions == ("negative a one", "negative a two", "negative a three")
    assert by_name["b.jpg"].negative_captions == by_name["c.jpg"].negative_captions == ()
    assert by_name["d.jpg"].negative_captions == ()
    assert by_name["e.jpg"].negative_captions == ("only one ünïcode negative",)
    assert dict(skipped) == {"negatives_not_utf8": 1, "empty_negatives": 1}


def test_missing_negative_folder_is_one_line(tmp_path):
    from clip_tao.data.custom import scan_custom_datasets
    from clip_tao.errors import DataError

    entry = _folder_with_negatives(tmp_path)
    entry.negative_caption_dir = str(tmp_path / "nope")
    with pytest.raises(DataError, match=r"dataset.train.datasets\[0\].negative_caption_dir .*nope.* does not exist"):
        scan_custom_datasets([entry], "dataset.train.datasets")


def _decoded(batch, tokenizer, pool):
    """The negative texts of each row, read back by matching token rows against the candidates."""
    tokens = {tuple(tokenizer([text])[0].tolist()): text for text in pool}
    rows = [] if batch.get("negative_ids") is None else [tokens[tuple(r.tolist())] for r in batch["negative_ids"]]
    out, at = [], 0
    for valid in batch["pair_info"].negative_valid:
        n = int(valid.sum())
        out.append(rows[at : at + n])
        at += n
    return out


def test_training_batches_carry_seeded_hard_negatives(tmp_path):
    from clip_tao.config.schema import DatasetConfig
    from clip_tao.data.loaders import build_train_loader
    from clip_tao.data.pairs import PairOptions
    from clip_tao.models import create_model

    model = create_model("tiny-clip", pretrained=False)
    cfg = DatasetConfig()
    cfg.train.datasets = [_folder_with_negatives(tmp_path)]
    cfg.train.batch_size = 6
    pool = ["negative a one", "negative a two", "negative a three", "only one ünïcode negative", "f one", "f two"]

    def epoch_negatives(epoch, workers):
        cfg.train.num_workers = workers
        bundle = build_train_loader(cfg, model.preprocess, model.tokenizer, pairs=PairOptions(2))
        bundle.set_epoch(epoch)
        (batch,) = list(bundle.loader)
        assert batch["pair_info"].negative_ids.shape == (6, 2)
        names = [k.rsplit("/", 1)[-1] for k in batch["keys"]]
        return dict(zip(names, _decoded(batch, model.tokenizer, pool)))

    first = epoch_negatives(0, 0)
    assert len(first["a.jpg"]) == 2 and set(first["a.jpg"]) < {"negative a one", "negative a two", "negative a three"}
    assert first["e.jpg"] == ["only one ünïcode negative"] and sorted(first["f.jpg"]) == ["f one", "f two"]
    assert first["b.jpg"] == first["c.jpg"] == first["d.jpg"] == []
    assert epoch_negatives(0, 2) == first  # the draw is the sample's, whichever worker loads it
    drawn = {tuple(sorted(epoch_negatives(epoch, 0)["a.jpg"])) for epoch in range(8)}
    assert len(drawn) > 1  # a fresh draw each epoch: every negative gets used


def test_shard_negatives_come_from_neg_txt(tmp_path):
    import webdataset

    from clip_tao.config.schema import DatasetConfig
    from clip_tao.data.custom import SkipCounter
    from clip_tao.data.loaders import build_train_loader
    from clip_tao.data.pairs import PairOptions
    from clip_tao.models import create_model
    from tests.shards import square

    (tmp_path / "s").mkdir()
    negatives = {0: b"neg zero\n", 1: b"", 2: b"\xff\xfe bad", 3: b"neg three a\nneg three b\n"}
    with webdataset.ShardWriter(str(tmp_path / "s" / "shard-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(8):
            image, caption = square(i)
            sample = {"__key__": f"{i:06d}", "jpg": image, "txt": caption}
            if i in negatives:
                sample["neg.txt"] = negatives[i]
            sink.write(sample)
    model = create_model("tiny-clip", pretrained=False)
    cfg = DatasetConfig()
    cfg.train.type = "wds"
    cfg.train.batch_size = 8
    cfg.train.num_workers = 0
    cfg.train.wds.root_dir = str(tmp_path / "s")
    cfg.train.wds.samples_per_shard = 8
    bundle = build_train_loader(cfg, model.preprocess, model.tokenizer, pairs=PairOptions(2))
    bundle.set_epoch(0)
    (batch,) = list(bundle.loader)
    got = dict(zip([k.rsplit("/", 1)[-1] for k in batch["keys"]],
                   _decoded(batch, model.tokenizer, ["neg zero", "neg three a", "neg three b"])))  # fmt: skip
    assert got["000000"] == ["neg zero"] and sorted(got["000003"]) == ["neg three a", "neg three b"]
    assert all(got[f"{i:06d}"] == [] for i in (1, 2, 4, 5, 6, 7))
    assert SkipCounter(batch["skipped"]) == {"empty_negatives": 1, "negatives_not_utf8": 1}


def test_duplicate_images_are_found_by_content(tmp_path):
    """A byte-identical copy under another name gets the same image id; a re-encoded look-alike does not."""
    import shutil

    from clip_tao.config.schema import DatasetEntry
    from clip_tao.data.custom import scan_custom_datasets

    _image(tmp_path / "d" / "x.jpg", (10, 20, 30))
    shutil.copy(tmp_path / "d" / "x.jpg", tmp_path / "d" / "x_copy.jpg")
    _image(tmp_path / "d" / "y.png", (10, 20, 30))
    for name in ("x", "x_copy", "y"):
        (tmp_path / "d" / f"{name}.txt").write_text(f"caption {name}")
    samples, _ = scan_custom_datasets([DatasetEntry(str(tmp_path / "d"))], "train", hash_images=True)
    ids = {s.key.rsplit("/", 1)[-1]: s.content_id for s in samples}
    assert ids["x.jpg"] == ids["x_copy.jpg"] != ids["y.png"]
    plain, _ = scan_custom_datasets([DatasetEntry(str(tmp_path / "d"))], "train")
    assert all(s.content_id is None for s in plain)  # only read when duplicate_pairs needs it


def test_negative_count_of_negatives_is_a_config_error(tmp_path):
    from clip_tao.config.schema import DatasetConfig
    from clip_tao.data.loaders import build_train_loader
    from clip_tao.data.pairs import PairOptions
    from clip_tao.errors import ConfigError
    from clip_tao.models import create_model

    model = create_model("tiny-clip", pretrained=False)
    cfg = DatasetConfig()
    cfg.train.datasets = [_folder_with_negatives(tmp_path)]
    with pytest.raises(ConfigError, match="train.hard_negatives_per_sample=-1 must be >= 0"):
        build_train_loader(cfg, model.preprocess, model.tokenizer, pairs=PairOptions(-1))

"""WebDataset shards: finding, reading (three writers), bad data, epoch split, exact resumption, evaluation."""

import json
import logging

import pytest
import torch

from clip_tao.config.schema import DatasetConfig, WdsConfig
from clip_tao.data import wds
from clip_tao.data.custom import SkipCounter
from clip_tao.data.loaders import build_train_loader, build_val_loader
from clip_tao.errors import DataError
from clip_tao.models import create_model
from tests.shards import gnu_tar_shard, square, write_gnu_tar, write_img2dataset, write_shardwriter


@pytest.fixture(scope="module")
def model():
    return create_model("tiny-clip", pretrained=False)


def _keys_of_shards(shards):
    skipped = SkipCounter()
    return [raw["__key__"] for shard in shards for raw in wds.iter_raw_samples(shard, skipped)], skipped


def _train_cfg(root=None, batch_size=4, workers=0, **wds_keys) -> DatasetConfig:
    cfg = DatasetConfig(seed=7)
    cfg.train.type = "wds"
    cfg.train.batch_size = batch_size
    cfg.train.num_workers = workers
    cfg.train.wds = WdsConfig(root_dir=str(root) if root else None, **wds_keys)
    return cfg


def test_three_writers_are_found_recursively_and_read(tmp_path, model):
    write_shardwriter(tmp_path / "a", 10, per_shard=4)  # 3 shards: 4 + 4 + 2
    write_img2dataset(tmp_path / "b" / "deeper", 5, per_shard=5, start=100)
    gnu_tar_shard(tmp_path / "c" / "plain.tar", 3, start=200, png=True)
    shards = wds.list_shards(WdsConfig(root_dir=str(tmp_path), samples_per_shard=4), "dataset.train.wds")
    assert [s.url.replace(str(tmp_path), "") for s in shards] == [
        "/a/shard-000000.tar", "/a/shard-000001.tar", "/a/shard-000002.tar", "/b/deeper/00000.tar", "/c/plain.tar",
    ]  # fmt: skip
    assert [s.num_samples for s in shards] == [None, None, None, 5, None]  # img2dataset's _stats.json
    assert wds.epoch_samples(shards, 4) == 4 * 4 + 5
    keys, skipped = _keys_of_shards(shards)
    assert len(keys) == 18 and not skipped
    assert keys[-3:] == ["g00200", "g00201", "g00202"] and "000000004" in keys  # GNU tar, img2dataset
    for shard in shards:  # every writer's samples decode to an image and a caption
        raw = next(wds.iter_raw_samples(shard, SkipCounter()))
        image, caption, problem = wds.decode_pair(raw)
        assert problem is None and image.size == (48, 48) and caption.startswith("a ")


def test_shard_list_file_relative_absolute_braces_and_sizes(tmp_path):
    write_shardwriter(tmp_path / "s", 12, per_shard=3)  # shard-000000 .. shard-000003
    (tmp_path / "s" / "sizes.json").write_text(json.dumps({f"shard-{i:06d}.tar": 3 for i in range(4)}))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# shards\ns/shard-{{000000..000002}}.tar\n\n{tmp_path / 's' / 'shard-000003.tar'}\n")
    shards = wds.list_shards(WdsConfig(root_dir=str(tmp_path), shard_list_file=str(listing)), "x")
    assert [s.url for s in shards] == [str(tmp_path / "s" / f"shard-{i:06d}.tar") for i in range(4)]
    assert [s.num_samples for s in shards] == [3, 3, 3, 3]
    listing.write_text("s/shard-000009.tar\n")
    with pytest.raises(DataError, match="shard-000009.tar' does not exist"):
        wds.list_shards(WdsConfig(root_dir=str(tmp_path), shard_list_file=str(listing)), "dataset.train.wds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar shards"):
        wds.list_shards(WdsConfig(root_dir=str(tmp_path / "empty")), "x")


def test_bad_samples_truncated_and_unreadable_shards_are_skipped_and_counted(tmp_path, model, caplog):
    good_image, caption = square(1)
    write_gnu_tar(
        tmp_path / "d" / "mixed.tar",
        {
            "ok1": {"jpg": good_image, "txt": caption.encode()},
            "nocap": {"jpg": good_image},
            "noimg": {"txt": b"only a caption"},
            "broken": {"jpg": b"not a jpeg at all", "txt": b"a caption"},
            "empty": {"jpg": good_image, "txt": b"   "},
            "latin1": {"jpg": good_image, "txt": b"caf\xe9"},
            "ok2": {"webp": square(2, fmt="WEBP")[0], "txt": b"a webp image"},
        },
    )
    whole = write_shardwriter(tmp_path / "t", 6, per_shard=6)[0]
    data = whole.read_bytes()
    (tmp_path / "d" / "truncated.tar").write_bytes(data[: len(data) // 2])
    whole.unlink()
    (tmp_path / "d" / "zz_garbage.tar").write_bytes(b"this is not a tar file" * 100)
    cfg = _train_cfg(tmp_path / "d", batch_size=2, samples_per_shard=6)
    with caplog.at_level(logging.WARNING):
        bundle = build_train_loader(cfg, model.preprocess, model.tokenizer)
        bundle.set_epoch(0)
        batches = list(bundle.loader)
    skipped = SkipCounter()
    for batch in batches:
        skipped.update(batch["skipped"])
    for reason in ("missing_caption", "missing_image", "undecodable_image", "empty_caption", "caption_not_utf8"):
        assert skipped[reason] >= 1, reason
    assert skipped["truncated_shard"] >= 1 and skipped["unreadable_shard"] >= 1
    assert "zz_garbage.tar" in caplog.text and "truncated.tar" in caplog.text
    keys = {k for b in batches for k in b["keys"]}
    assert {"mixed.tar/ok1", "mixed.tar/ok2"} <= keys
    assert all(b["pixels"].shape[0] == 2 for b in batches)  # batches stay full: bad samples are replaced


def _steps(tmp_path, model, root, layout, epoch=3, resume=None, **wds_keys):
    """Per global step, the keys every rank trained on (``layout``: processes, workers, batch_size,
    accumulate); with ``resume`` = ``(steps_done, positions)`` the rest of the epoch from there."""
    ranks, workers, batch_size, accumulate = layout
    per_rank = []
    for rank in range(ranks):
        cfg = _train_cfg(tmp_path / root, batch_size=batch_size, workers=workers, samples_per_shard=4, **wds_keys)
        bundle = build_train_loader(cfg, model.preprocess, model.tokenizer, rank, ranks, accumulate)
        bundle.set_epoch(epoch)
        if resume:
            bundle.resume_at(resume[0] * accumulate, resume[1])
        batches = list(bundle.batches())
        assert len(batches) == bundle.batches_per_epoch - (resume[0] * accumulate if resume else 0)
        assert all(len(b["keys"]) == batch_size for b in batches)
        per_rank.append([batches[k : k + accumulate] for k in range(0, len(batches), accumulate)])
    assert len({len(steps) for steps in per_rank}) == 1  # every rank runs the same number of steps
    steps = []
    for parts in zip(*per_rank):
        steps.append(sorted(k for part in parts for b in part for k in b["keys"]))
    positions = {}
    for steps_of_rank in per_rank:  # what the trainer checkpoints: every stream, after the first step
        positions.update(steps_of_rank[0][-1]["position"])
    return steps, positions


# (processes, workers, batch_size, accumulate): a global batch of 4 in every layout
LAYOUTS = [(1, 0, 4, 1), (1, 2, 4, 1), (2, 0, 2, 1), (2, 2, 2, 1), (1, 2, 2, 2), (2, 1, 1, 2), (4, 0, 1, 1)]


def test_a_global_steps_samples_do_not_depend_on_processes_or_workers(tmp_path, model):
    # 5 shards of uneven size (4,4,4,4,1 = 17 samples; samples_per_shard=4 -> epoch of 20 = 5 steps of 4)
    write_shardwriter(tmp_path / "u", 17, per_shard=4)
    reference, _ = _steps(tmp_path, model, "u", LAYOUTS[0])
    assert len(reference) == 5 and all(len(step) == 4 for step in reference)
    for layout in LAYOUTS[1:]:
        assert _steps(tmp_path, model, "u", layout)[0] == reference, layout
    keys = [k for step in reference for k in step]
    assert len(keys) == 20 and len(set(keys)) == 17  # 4 streams of 5: the short one reads its shard again
    other_epoch, _ = _steps(tmp_path, model, "u", LAYOUTS[0], epoch=4)
    assert other_epoch != reference  # reshuffled per epoch, deterministic


def test_resuming_on_another_layout_continues_exactly(tmp_path, model):
    write_shardwriter(tmp_path / "r", 26, per_shard=5)  # 6 shards (the last has 1 sample): 4 streams
    (tmp_path / "r" / "sizes.json").write_text(json.dumps({f"shard-{i:06d}.tar": 5 for i in range(5)} |
                                                          {"shard-000005.tar": 1}))  # fmt: skip
    straight, _ = _steps(tmp_path, model, "r", LAYOUTS[0])
    for before, after in [(LAYOUTS[3], LAYOUTS[0]), (LAYOUTS[0], LAYOUTS[3]), (LAYOUTS[2], LAYOUTS[4])]:
        _, positions = _steps(tmp_path, model, "r", before)  # positions after the first step
        rest, _ = _steps(tmp_path, model, "r", after, resume=(1, positions))
        assert rest == straight[1:], (before, after)


def test_layouts_that_cannot_work_are_one_line_with_the_counts_that_do(tmp_path, model):
    write_shardwriter(tmp_path / "one", 4, per_shard=4)
    cfg = _train_cfg(tmp_path / "one", batch_size=2, samples_per_shard=4)
    with pytest.raises(DataError, match=r"1 sample streams cannot be split over 2 processes.*counts that work are 1 "
                                        r".*2 processes need at least 2 shards"):  # fmt: skip
        build_train_loader(cfg, model.preprocess, model.tokenizer, rank=0, world_size=2)
    write_shardwriter(tmp_path / "six", 24, per_shard=4)
    cfg = _train_cfg(tmp_path / "six", batch_size=4, samples_per_shard=4, streams=3)
    with pytest.raises(DataError, match=r"global batch 4 .* not a multiple of dataset.train.wds.streams=3; "
                                        r"streams that work: 1, 2, 4"):  # fmt: skip
        build_train_loader(cfg, model.preprocess, model.tokenizer)
    cfg = _train_cfg(tmp_path / "six", batch_size=8, samples_per_shard=4, streams=8)
    with pytest.raises(DataError, match="6 shard\\(s\\) for dataset.train.wds.streams=8.* at least 8 shards"):
        build_train_loader(cfg, model.preprocess, model.tokenizer)


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_from_recorded_positions_continues_exactly(tmp_path, model, workers):
    write_shardwriter(tmp_path / "r", 26, per_shard=5)  # 6 shards (the last has 1 sample)
    cfg = _train_cfg(tmp_path / "r", batch_size=3, workers=workers, samples_per_shard=5)

    def fresh():
        bundle = build_train_loader(cfg, model.preprocess, model.tokenizer)
        bundle.set_epoch(2)
        return bundle

    straight = list(fresh().batches())
    assert len(straight) == fresh().batches_per_epoch >= 6
    for stop in (1, 3):
        positions: dict = {}
        for batch in straight[:stop]:  # what the trainer records
            positions.update(batch["position"])
        bundle = fresh()
        bundle.resume_at(stop, positions)
        rest = list(bundle.batches())
        assert [b["keys"] for b in rest] == [b["keys"] for b in straight[stop:]]
        for a, b in zip(rest, straight[stop:]):
            assert torch.equal(a["pixels"], b["pixels"])  # the same augmentation, whichever worker


def test_augmentation_does_not_depend_on_workers(tmp_path, model):
    write_shardwriter(tmp_path / "w", 16, per_shard=4)
    runs = []
    for workers in (0, 2):
        # One slot either way: a single rank with shards >= workers keeps the worker count, so compare
        # the same sample's pixels by key across layouts.
        bundle = build_train_loader(_train_cfg(tmp_path / "w", 4, workers, samples_per_shard=4), model.preprocess,
                                    model.tokenizer)  # fmt: skip
        bundle.set_epoch(0)
        runs.append({k: b["pixels"][i] for b in bundle.loader for i, k in enumerate(b["keys"])})
    # the same sample in the same epoch and pass gets the same augmentation in both layouts
    common = set(runs[0]) & set(runs[1])
    assert common and all(torch.equal(runs[0][k], runs[1][k]) for k in common)


def test_validation_reads_every_sample_once(tmp_path, model):
    write_shardwriter(tmp_path / "v", 11, per_shard=4)
    cfg = DatasetConfig()
    cfg.val.type = "wds"
    cfg.val.wds = WdsConfig(root_dir=str(tmp_path / "v"))
    cfg.val.batch_size = 4
    cfg.val.num_workers = 2
    bundle = build_val_loader(cfg, model.preprocess, model.tokenizer)
    batches = list(bundle.loader)
    assert sum(len(b["indices"]) for b in batches) == 11
    assert sorted(k for b in batches for k in b["keys"]) == [f"shard-{i // 4:06d}.tar/{i:06d}" for i in range(11)]
    indices = torch.cat([b["indices"] for b in batches])
    assert len(set(indices.tolist())) == 11


def test_cli_trains_validates_and_evaluates_on_shards(tiny_spec, tmp_path):
    import yaml

    from clip_tao.cli import main

    spec = tiny_spec(train={"num_epochs": 1})
    write_shardwriter(tmp_path / "train_shards", 32, per_shard=8)
    (tmp_path / "train_shards" / "shard-000003.tar").write_bytes(b"garbage")  # an unreadable shard
    write_shardwriter(tmp_path / "val_shards", 12, per_shard=6, start=500)
    data = yaml.safe_load(spec.read_text())
    data["dataset"]["train"] = {"type": "wds", "batch_size": 8, "num_workers": 0,
                                "wds": {"root_dir": str(tmp_path / "train_shards"), "samples_per_shard": 8}}  # fmt: skip
    data["dataset"]["val"] = {"type": "wds", "batch_size": 8, "num_workers": 0,
                              "wds": {"root_dir": str(tmp_path / "val_shards")}}  # fmt: skip
    data["evaluate"] = {"batch_size": 8, "num_workers": 0}
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", "-e", str(spec)]) == 0
    train = tmp_path / "results" / "train"
    lines = [json.loads(line) for line in (train / "status.json").read_text().splitlines()]
    epoch = next(line for line in lines if line["status"] == "RUNNING")
    assert epoch["skipped"]["unreadable_shard"] >= 1 and "t2i_mAP" in epoch["kpi"]
    assert torch.load(train / "clip_latest.pth", weights_only=True)["global_step"] == 4  # 32 samples / 8
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={train / 'clip_latest.pth'}"]) == 0
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    assert results["num_images"] == 12


def test_shards_without_a_usable_sample_stop_training_with_one_line(tiny_spec, tmp_path, capsys):
    import yaml

    from clip_tao.cli import main

    spec = tiny_spec(train={"num_epochs": 1})
    (tmp_path / "bad").mkdir()
    for i in range(2):
        (tmp_path / "bad" / f"b{i}.tar").write_bytes(b"not a tar" * 10)
    data = yaml.safe_load(spec.read_text())
    data["dataset"]["train"] = {"type": "wds", "batch_size": 4, "num_workers": 2,
                                "wds": {"root_dir": str(tmp_path / "bad"), "samples_per_shard": 8}}  # fmt: skip
    spec.write_text(yaml.safe_dump(data))
    assert main(["train", "-e", str(spec)]) == 1
    err = capsys.readouterr().err
    line = err[err.index("clip-tao train: error:") :].splitlines()[0]  # after the progress bar's output
    assert line.startswith("clip-tao train: error: no usable sample in shard(s)") and line.endswith(".tar")
    assert "Traceback" not in err

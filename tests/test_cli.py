"""End-to-end: the real CLI on tiny models and tiny generated data."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from clip_tao.cli import main
from tests.conftest import REPO


def _status_lines(folder):
    return [json.loads(line) for line in (folder / "status.json").read_text().splitlines()]


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("model_type", ["tiny-clip", "tiny-siglip2"])
def test_train_evaluate_inference(tiny_spec, tmp_path, model_type):
    spec = tiny_spec(model_type)
    assert main(["train", "-e", str(spec)]) == 0
    train = tmp_path / "results" / "train"
    names = {p.name for p in train.iterdir()}
    assert {
        "model_epoch_000_step_00003.pth",
        "model_epoch_001_step_00006.pth",
        "clip_latest.pth",
        "clip_best.pth",
    } <= names
    assert {"experiment.yaml", "status.json", "training_summary.json", "tensorboard"} <= names
    latest = torch.load(train / "clip_latest.pth", weights_only=True)  # plain data only
    assert latest["epoch"] == 2 and latest["global_step"] == 6 and latest["model_type"] == model_type
    assert latest["config"]["model"]["type"] == model_type
    lines = _status_lines(train)
    assert lines[0]["status"] == "STARTED" and lines[-1]["status"] == "SUCCESS"
    epochs = [line for line in lines if line["status"] == "RUNNING"]
    assert len(epochs) == 2 and "t2i_mAP" in epochs[-1]["kpi"] and "train_loss" in epochs[0]["kpi"]
    assert any(p.name.startswith("events.out.tfevents") for p in (train / "tensorboard").iterdir())

    checkpoint = f"evaluate.checkpoint={train / 'clip_latest.pth'}"
    assert main(["evaluate", "-e", str(spec), checkpoint]) == 0
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    for direction in ("i2t", "t2i"):
        for figure in ("R@1", "R@5", "R@10", "mAP", "MedR", "MeanR", "AUC"):
            assert f"{direction}_{figure}" in results
    assert results["num_images"] == results["num_texts"] == 16
    assert (tmp_path / "results" / "evaluate" / "experiment.yaml").is_file()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue square on green\n")
    overrides = [f"inference.text_file={prompts}", f"inference.datasets=[{{image_dir: {tmp_path / 'data' / 'val'}}}]"]
    assert main(["inference", "-e", str(spec), *overrides]) == 0  # no checkpoint: the model's own weights
    out = tmp_path / "results" / "inference"
    with h5py.File(out / "image_embeddings.h5") as f:
        emb = f["embeddings"][()]
        assert emb.dtype == np.float32 and emb.shape[0] == 16 and f.attrs["num_images"] == 16
        assert f.attrs["embedding_dim"] == emb.shape[1] and f.attrs["embedding_type"] == "image"
        assert f["embeddings"].compression == "gzip"
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
        assert f["image_paths"][0].decode().endswith("img_000.jpg")
    with h5py.File(out / "text_embeddings.h5") as f:
        assert f["embeddings"].shape[0] == 2 and f.attrs["num_texts"] == 2
        assert [t.decode() for t in f["texts"][()]] == ["a red square", "a blue square on green"]


def test_resume_gives_the_same_weights(tiny_spec, tmp_path):
    spec = tiny_spec()
    assert main(["train", "-e", str(spec)]) == 0
    straight = tmp_path / "results" / "train"
    first_epoch = straight / "model_epoch_000_step_00003.pth"
    resumed = tmp_path / "resumed"
    args = [f"results_dir={resumed}", f"train.resume_training_checkpoint_path={first_epoch}"]
    assert main(["train", "-e", str(spec), *args]) == 0
    a, b = _weights(straight / "clip_latest.pth"), _weights(resumed / "train" / "clip_latest.pth")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_from_the_middle_of_an_epoch(tiny_spec, tmp_path):
    spec = tiny_spec(train={"checkpoint_interval_unit": "step", "checkpoint_interval": 2})
    assert main(["train", "-e", str(spec)]) == 0
    straight = tmp_path / "results" / "train"
    middle = straight / "model_epoch_000_step_00002.pth"  # 2 of the 3 batches of epoch 0 done
    assert torch.load(middle, weights_only=True)["batches_in_epoch"] == 2
    resumed = tmp_path / "resumed"
    assert (
        main(["train", "-e", str(spec), f"results_dir={resumed}", f"train.resume_training_checkpoint_path={middle}"])
        == 0
    )
    a, b = _weights(straight / "clip_latest.pth"), _weights(resumed / "train" / "clip_latest.pth")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_rerun_resumes_from_latest(tiny_spec, tmp_path):
    spec = tiny_spec(train={"num_epochs": 1})
    assert main(["train", "-e", str(spec)]) == 0
    assert main(["train", "-e", str(spec), "train.num_epochs=2"]) == 0
    latest = torch.load(tmp_path / "results" / "train" / "clip_latest.pth", weights_only=True)
    assert latest["epoch"] == 2 and latest["global_step"] == 6


def test_frozen_vision_tower_and_start_weights(tiny_spec, tmp_path):
    spec = tiny_spec(train={"num_epochs": 1})
    assert main(["train", "-e", str(spec), "model.freeze_vision_encoder=true", "train.auto_resume=false"]) == 0
    start = tmp_path / "results" / "train" / "clip_latest.pth"
    other = tmp_path / "other"
    args = [f"results_dir={other}", f"train.pretrained_model_path={start}", "model.freeze_vision_encoder=true"]
    assert main(["train", "-e", str(spec), *args]) == 0
    before, after = _weights(start), _weights(other / "train" / "clip_latest.pth")
    vision = [k for k in before if k.startswith("model.visual.")]
    text = [k for k in before if k.startswith("model.transformer.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not all(torch.equal(before[k], after[k]) for k in text)


def test_training_survives_bad_files(tiny_spec, tmp_path):
    spec = tiny_spec(train={"num_epochs": 1})
    train_dir = tmp_path / "data" / "train"
    (train_dir / "img_000.txt").unlink()
    (train_dir / "img_001.txt").write_text("")
    (train_dir / "img_002.txt").write_bytes(b"\xff\xfe\xfa")
    (train_dir / "img_003.jpg").write_bytes(b"broken")
    (train_dir / "img_004.jpg").write_bytes((train_dir / "img_004.jpg").read_bytes()[:200])  # truncated
    assert main(["train", "-e", str(spec)]) == 0
    lines = _status_lines(tmp_path / "results" / "train")
    skipped = lines[-2]["skipped"]
    assert skipped["missing_caption"] == 1 and skipped["empty_caption"] == 1 and skipped["caption_not_utf8"] == 1
    assert skipped.get("undecodable_image", 0) >= 1  # a truncated JPEG may still decode partially
    summary = json.loads((tmp_path / "results" / "train" / "training_summary.json").read_text())
    assert sum(summary["skipped_files"].values()) >= 4


def test_user_errors_are_one_line(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    assert main(["train", "-e", str(spec), "train.num_epoch=3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "clip-tao train: error: unknown key train.num_epoch; did you mean train.num_epochs?"
    assert main(["evaluate", "-e", str(spec), "evaluate.datasets=[{image_dir: /no/such}]"]) == 1
    assert "evaluate.datasets[0].image_dir '/no/such' does not exist" in capsys.readouterr().err
    assert main(["train", "-e", str(spec), "dataset.train.datasets=[]"]) == 1
    assert "dataset.train.datasets is empty" in capsys.readouterr().err
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={tmp_path / 'none.pth'}"]) == 1
    assert "none.pth' does not exist" in capsys.readouterr().err
    lines = _status_lines(tmp_path / "results" / "evaluate")
    assert lines[-1]["status"] == "FAILURE"


def test_console_script_help_and_list_models():
    run = subprocess.run([sys.executable, "-m", "clip_tao", "list-models"], capture_output=True, text=True, check=True)
    assert "tiny-clip" in run.stdout and "tiny-siglip2" in run.stdout and "embed dim" in run.stdout
    for argv in (["--help"], ["train", "--help"]):
        run = subprocess.run([sys.executable, "-m", "clip_tao", *argv], capture_output=True, text=True, check=True)
        assert "usage: clip-tao" in run.stdout


def test_quickstart_learns(tmp_path, monkeypatch):
    """The README's quickstart, as written: trains on the shipped demo data well above chance (1%)."""
    monkeypatch.chdir(REPO)
    assert main(["train", "-e", "specs/quickstart.yaml", f"results_dir={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "train" / "training_summary.json").read_text())
    assert summary["final"]["t2i_R@1"] > 25.0 and summary["final"]["i2t_R@1"] > 25.0
    assert main(["evaluate", "-e", "specs/quickstart.yaml", f"results_dir={tmp_path}"]) == 0
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert results["t2i_R@1"] > 25.0 and results["num_images"] == 100
    assert main(["inference", "-e", "specs/quickstart.yaml", f"results_dir={tmp_path}"]) == 0
    with h5py.File(tmp_path / "inference" / "text_embeddings.h5") as f:
        assert f["embeddings"].shape == (3, 64)


def test_make_demo_data_is_what_ships(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(tmp_path)], check=True)
    for split in ("train", "val"):
        shipped = sorted(p.name for p in (REPO / "data" / "demo" / split / "captions").iterdir())
        assert shipped == sorted(p.name for p in (tmp_path / split / "captions").iterdir())
        for name in shipped[:20]:
            assert (REPO / "data/demo" / split / "captions" / name).read_text() == (
                tmp_path / split / "captions" / name
            ).read_text()

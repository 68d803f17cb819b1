"""A diverged or NaN model fails with one line: never saved, never scored, never written as bare NaN."""

from __future__ import annotations

import json
import re

import torch

from clip_tao.cli import main
from clip_tao.models import create_model


def _error_line(stderr: str) -> str:
    """The one error line of the CLI (progress bars also write to stderr)."""
    (line,) = [part for part in stderr.replace("\r", "\n").splitlines() if part.startswith("clip-tao ")]
    return line


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"bare {name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _nan_state(model_type: str) -> dict[str, torch.Tensor]:
    """A state dict of ``model_type`` whose floating-point tensors are all NaN."""
    state = create_model(model_type, pretrained=False).state_dict()
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}


def test_weights_that_overflow_are_never_saved(tiny_spec, tmp_path, capsys):
    # An absurd learning rate turns weights infinite in the first update, while that step's loss was finite:
    # the checkpoint after it (checkpoints every step) must not be written.
    spec = tiny_spec(train={"num_epochs": 1, "precision": "fp32", "checkpoint_interval_unit": "step",
                            "optim": {"warmup_steps": 0, "vision_lr": 1e37, "text_lr": 1e37}})  # fmt: skip
    assert main(["train", "-e", str(spec)]) == 1
    err = _error_line(capsys.readouterr().err)
    assert "diverged at step 1" in err and "no checkpoint was written" in err
    train = tmp_path / "results" / "train"
    assert not list(train.glob("*.pth"))
    last = [_strict_json(line) for line in (train / "status.json").read_text().splitlines()][-1]
    assert last["status"] == "FAILURE"


def test_evaluating_a_nan_checkpoint_fails_with_one_line(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    state = _nan_state("tiny-clip")
    checkpoint = tmp_path / "nan.pth"
    torch.save({"model": state, "model_type": "tiny-clip"}, checkpoint)
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={checkpoint}"]) == 1
    assert "NaN/inf for 16 of 16 image embeddings" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "results" / "evaluate" / "results.json").exists()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    args = ["inference", "-e", str(spec), f"inference.checkpoint={checkpoint}", f"inference.text_file={prompts}"]
    args.append(f"inference.datasets=[{{image_dir: {tmp_path / 'data' / 'val'}}}]")
    assert main(args) == 1
    # inference checks each part before writing it: the first part's images, all NaN, and nothing written
    assert re.search(r"NaN/inf for (\d+) of \1 image embeddings", _error_line(capsys.readouterr().err))
    inference = tmp_path / "results" / "inference"
    assert not (inference / "image_embeddings.h5").exists() and not list(inference.rglob("*.npy"))


def test_every_json_written_is_strict_json(tiny_spec, tmp_path):
    # Without validation data the best value stays -inf, which Python's json writes as bare -Infinity.
    spec = tiny_spec(num_train=32, train={"num_epochs": 1, "precision": "fp32"})
    assert main(["train", "-e", str(spec), "dataset.val.datasets=[]"]) == 0
    train = tmp_path / "results" / "train"
    summary = _strict_json((train / "training_summary.json").read_text())
    assert summary["best"]["value"] is None
    for line in (train / "status.json").read_text().splitlines():
        _strict_json(line)


def test_a_diverging_run_keeps_the_last_good_checkpoint(tiny_spec, tmp_path, capsys):
    spec = tiny_spec(num_train=32, train={"num_epochs": 1, "precision": "fp32"})
    assert main(["train", "-e", str(spec)]) == 0
    latest = tmp_path / "results" / "train" / "clip_latest.pth"
    good = torch.load(latest, weights_only=True)["model"]
    # A second run into the same folder, from those weights, with a learning rate that overflows the weights.
    args = ["train.auto_resume=false", f"train.pretrained_model_path={latest}", "train.checkpoint_interval_unit=step",
            "train.optim.vision_lr=3.3e38", "train.optim.text_lr=3.3e38", "train.optim.warmup_steps=0"]  # fmt: skip
    assert main(["train", "-e", str(spec), *args]) == 1
    # The fused AdamW (CPU and CUDA) writes the overflow into the weights, which the step's checkpoint refuses;
    # torch's per-tensor loop raises it at once ("the optimiser's update overflowed"). Either is one line.
    err = _error_line(capsys.readouterr().err)
    assert "training diverged at step 1: " in err and "NaN/inf" in err and "lower train.optim.vision_lr" in err
    kept = torch.load(latest, weights_only=True)["model"]
    assert all(torch.equal(kept[k], good[k]) for k in good)  # clip_latest.pth still holds the good weights


def test_a_non_finite_loss_stops_training_with_one_line(tiny_spec, tmp_path, capsys):
    # Start weights that are NaN give a NaN loss from the first step: training stops, nothing is saved.
    spec = tiny_spec(num_train=32, train={"num_epochs": 2, "precision": "fp32", "checkpoint_interval_unit": "step"})
    state = _nan_state("tiny-clip")
    start = tmp_path / "nan_start.pth"
    torch.save({"model": state, "model_type": "tiny-clip"}, start)
    assert main(["train", "-e", str(spec), f"train.pretrained_model_path={start}"]) == 1
    err = _error_line(capsys.readouterr().err)
    assert "training loss became nan by step 1" in err and "train.optim" in err
    train = tmp_path / "results" / "train"
    assert not list(train.glob("*.pth"))
    last = [_strict_json(line) for line in (train / "status.json").read_text().splitlines()][-1]
    assert last["status"] == "FAILURE"

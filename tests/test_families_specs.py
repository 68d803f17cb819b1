"""The family specs in specs/ run as written, given weights: tiny published-format weights and tiny data
are substituted through overrides (paths and sizes only), then train -> evaluate runs through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_tao.cli import main
from tests.conftest import REPO, make_dataset
from tests.family_assets import (
    TINY_NVCLIP,
    make_bert_vocab,
    make_gemma_tokenizer,
    make_openclip_folder,
    make_radio_checkpoint,
    make_siglip_folder,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    make_gemma_tokenizer(root / "gemma")
    make_siglip_folder(root / "siglip2", root / "gemma")
    make_bert_vocab(root / "bert")
    clip = make_openclip_folder(root / "nvclip", TINY_NVCLIP, root / "bert")
    import torch

    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, root / "nvclip.pt")
    make_radio_checkpoint(root / "c-radio.pth.tar", {0: 24, 1: 32})
    return root


def _overrides(tmp_path: Path, weights: Path, spec: str) -> list[str]:
    train = make_dataset(tmp_path / "train", 16, seed=1, size=48)
    val = make_dataset(tmp_path / "val", 8, seed=2, size=48)
    common = [
        f"results_dir={tmp_path / 'results'}",
        f"dataset.train.datasets=[{{image_dir: {train}}}]",
        f"dataset.val.datasets=[{{image_dir: {val}}}]",
        f"evaluate.datasets=[{{image_dir: {val}}}]",
        "dataset.train.batch_size=8",
        "dataset.val.batch_size=8",
        "evaluate.batch_size=8",
        "dataset.train.num_workers=0",
        "dataset.val.num_workers=0",
        "evaluate.num_workers=0",
        "train.num_epochs=1",
        "train.precision=fp32",
        "train.optim.warmup_steps=1",
    ]
    per_spec = {
        "siglip2": [f"model.pretrained_path={weights / 'siglip2'}", "model.image_size=32"],
        "radio_clip": [
            f"model.pretrained_path={weights / 'c-radio.pth.tar'}",
            f"model.text_pretrained_path={weights / 'siglip2'}",
            "model.image_size=64",
        ],
        "nvclip": [
            f"model.pretrained_path={weights / 'nvclip'}",
            f"train.pretrained_model_path={weights / 'nvclip.pt'}",
            "model.image_size=28",
        ],
    }
    return common + per_spec[spec]


@pytest.mark.parametrize("spec", ["siglip2", "radio_clip", "nvclip"])
def test_family_spec_trains_and_evaluates(spec, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    overrides = _overrides(tmp_path, weights, spec)
    assert main(["train", "-e", f"specs/{spec}.yaml", *overrides]) == 0
    summary = json.loads((tmp_path / "results" / "train" / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["final"]["train_loss"] == summary["final"]["train_loss"]
    assert main(["evaluate", "-e", f"specs/{spec}.yaml", *overrides]) == 0
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    assert results["num_images"] == 8


def test_radio_without_adaptor_is_one_line(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    overrides = [*_overrides(tmp_path, weights, "radio_clip"), "model.adaptor_name=null"]
    assert main(["train", "-e", "specs/radio_clip.yaml", *overrides]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "model.adaptor_name is required for c-radio_v3-b: set it to siglip or clip (aliases: dfn, dfn_clip)"
    )

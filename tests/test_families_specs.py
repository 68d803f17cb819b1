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


def test_radio_unknown_adaptor_is_one_line(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    overrides = [*_overrides(tmp_path, weights, "radio_clip"), "model.adaptor_name=dino"]
    assert main(["train", "-e", "specs/radio_clip.yaml", *overrides]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "model.adaptor_name='dino' is not a teacher of RADIO checkpoint" in err[-1]
    assert err[-1].endswith("(TAO's names: siglip, clip, dfn, dfn_clip)")


@pytest.mark.parametrize("spec", ["siglip2", "radio_clip", "nvclip"])
def test_family_exports_to_onnx_and_embeds_the_same(spec, weights, tmp_path, monkeypatch):
    """Each family's spec exports (its own encoder_type); ONNX Runtime embeds as PyTorch does."""
    import h5py
    import numpy as np

    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(REPO)
    overrides = _overrides(tmp_path, weights, spec)
    size = next(o.split("=")[1] for o in overrides if o.startswith("model.image_size="))
    onnx_file = tmp_path / "export" / f"{spec}.onnx"
    export = ["export.checkpoint=null", f"export.onnx_file={onnx_file}", "export.on_cpu=true"]
    export += [f"export.input_height={size}", f"export.input_width={size}"]
    assert main(["export", "-e", f"specs/{spec}.yaml", *overrides, *export]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square on blue\nA Green Square, on yellow!\n", encoding="utf-8")
    images = next(o for o in overrides if o.startswith("evaluate.datasets=")).split("=", 1)[1]
    embeddings = {}
    for backend, option in (("pytorch", "inference.checkpoint=null"), ("onnx", f"inference.onnx_file={onnx_file}")):
        out = [f"results_dir={tmp_path / backend}", "inference.checkpoint=null", option, "inference.num_workers=0"]
        out += [f"inference.text_file={prompts}", f"inference.datasets={images}"]
        assert main(["inference", "-e", f"specs/{spec}.yaml", *overrides, *out]) == 0
        for kind in ("image", "text"):
            with h5py.File(tmp_path / backend / "inference" / f"{kind}_embeddings.h5") as f:
                embeddings[backend, kind] = f["embeddings"][()]
    for kind in ("image", "text"):
        np.testing.assert_allclose(embeddings["onnx", kind], embeddings["pytorch", kind], atol=1e-5)

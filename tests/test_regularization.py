"""Geometry-preserving fine-tuning (``regularization``): measured drift from the starting model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clip_tao.cli import main
from clip_tao.config import load_experiment
from clip_tao.engine.model_setup import build_model
from clip_tao.engine.regularization import preservation_terms
from clip_tao.models import create_model


def test_terms_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = (F.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(4))
    terms = preservation_terms(s_img, s_txt, t_img, t_txt)
    mse = (((s_img - t_img) ** 2).mean() + ((s_txt - t_txt) ** 2).mean()) / 2
    cosine = ((1 - (s_img * t_img).sum(-1)).mean() + (1 - (s_txt * t_txt).sum(-1)).mean()) / 2
    similarity = ((s_img @ s_txt.T - t_img @ t_txt.T) ** 2).mean()
    torch.testing.assert_close(terms["embedding_mse"], mse)
    torch.testing.assert_close(terms["cosine"], cosine)
    torch.testing.assert_close(terms["similarity"], similarity)
    same = preservation_terms(s_img, s_txt, s_img, s_txt)
    assert all(float(v) < 1e-6 for v in same.values())


def _drift(cfg, checkpoint) -> float:
    """Mean 1 - cosine between the start model's and the fine-tuned model's embeddings of fixed inputs."""
    start = create_model("tiny-clip", pretrained=False).eval()
    tuned = build_model(cfg, checkpoint).eval()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(16, 3, start.image_size, start.image_size, generator=g)
    ids = start.tokenizer([f"a {c} square on {b}" for c in ("red", "green", "blue", "yellow") for b in "wxyz"])
    with torch.no_grad():
        image = F.cosine_similarity(start.encode_image(pixels), tuned.encode_image(pixels)).mean()
        text = F.cosine_similarity(start.encode_text(ids), tuned.encode_text(ids)).mean()
    return float(2 - image - text) / 2


def test_regularisation_keeps_embeddings_closer_to_the_start(tiny_spec, tmp_path):
    spec = tiny_spec(
        "tiny-clip",
        num_train=32,
        train={"num_epochs": 2, "optim": {"vision_lr": 1e-3, "text_lr": 1e-3, "warmup_steps": 1}},
    )
    common = ["train", "-e", str(spec), "wandb.enable=false", "dataset.train.batch_size=8"]
    weights = ["regularization.cosine_weight=100", "regularization.similarity_weight=100"]
    assert main([*common, f"results_dir={tmp_path}/plain"]) == 0
    assert main([*common, f"results_dir={tmp_path}/reg", "regularization.enabled=true", *weights]) == 0
    cfg = load_experiment(spec)
    plain = _drift(cfg, f"{tmp_path}/plain/train/clip_latest.pth")
    regularised = _drift(cfg, f"{tmp_path}/reg/train/clip_latest.pth")
    print(f"drift from the start: {plain:.4f} without, {regularised:.4f} with regularisation")
    assert 0 < regularised < 0.5 * plain, (regularised, plain)
    # Each term is reported on its own.
    status = (tmp_path / "reg" / "train" / "status.json").read_text(encoding="utf-8")
    lines = [json.loads(line) for line in status.splitlines()]
    kpi = [line["kpi"] for line in lines if "kpi" in line and "reg_cosine" in line["kpi"]]
    assert kpi and {"contrastive_loss", "reg_embedding_mse", "reg_cosine", "reg_similarity"} <= set(kpi[-1])
    # ... and under TAO 7.3's names, in status.json and TensorBoard; the validation drift is TAO's definition.
    kpi = [line["kpi"] for line in lines if line["status"] == "RUNNING"]  # the epoch lines
    tao = {"train/contrastive_loss", "train/emb_mse_loss", "train/cosine_loss", "train/sim_loss"}
    drift = {"val/img_drift", "val/txt_drift", "val/embedding_drift"}
    assert (tao | drift) <= set(kpi[-1])
    assert kpi[-1]["train/cosine_loss"] == kpi[-1]["reg_cosine"]
    last = kpi[-1]
    assert last["val/embedding_drift"] == pytest.approx((last["val/img_drift"] + last["val/txt_drift"]) / 2)
    assert 0 < last["val/img_drift"] < 2 and 0 < last["val/txt_drift"] < 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "reg" / "train" / "tensorboard")).Reload()
    assert (tao | drift) <= set(events.Tags()["scalars"])

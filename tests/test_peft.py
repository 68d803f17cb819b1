"""PEFT: TAO 7.3's tower modes (and 7.2's ``enabled``), LoRA on Hugging Face's ``peft`` library."""

from __future__ import annotations

import logging

import onnx
import pytest
import torch

from clip_tao.cli import main
from clip_tao.config import load_experiment
from clip_tao.config.schema import LoraTargetConfig, PeftConfig
from clip_tao.engine.checkpoint import load_checkpoint
from clip_tao.engine.lora import apply_lora, describe, lora_targets, merge_lora
from clip_tao.engine.model_setup import build_model
from clip_tao.errors import ConfigError
from clip_tao.models import create_model

PEFT = {"enabled": True, "vision": {"enabled": True, "num_last_blocks": 1}, "text": {"enabled": True, "rank": 4}}


def _inputs(model, n=4):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 3, model.image_size, model.image_size, generator=g)
    ids = model.tokenizer([f"a photo of thing {i}" for i in range(n)])
    return pixels, ids


def test_targets_follow_taos_keys():
    siglip = create_model("tiny-siglip2", pretrained=False)
    vision = lora_targets(siglip, "vision", LoraTargetConfig(num_last_blocks=1))
    # The last of the vision tower's blocks, TAO's default SigLIP2 targets; nothing of the text tower.
    assert sorted(vision) == sorted(
        f"model.vision_model.encoder.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    )
    text = lora_targets(siglip, "text", LoraTargetConfig(num_last_blocks=0, target_modules=["v_proj"]))
    assert text == [f"model.text_model.encoder.layers.{i}.self_attn.v_proj" for i in (0, 1)]
    # open_clip's fused attention (nn.MultiheadAttention) answers to "qkv"; "proj" also matches mlp.c_proj.
    clip = create_model("tiny-clip", pretrained=False)
    fused = lora_targets(clip, "vision", LoraTargetConfig(num_last_blocks=0, target_modules=["qkv", "proj"]))
    assert "model.visual.transformer.resblocks.0.attn" in fused
    assert "model.visual.transformer.resblocks.0.mlp.c_proj" in fused
    assert "model.visual.transformer.resblocks.0.attn.out_proj" not in fused  # covered by the attention adapter
    # open_clip's attention passes out_proj's weights to a kernel, never calling the module: adapt the attention.
    out_only = lora_targets(clip, "text", LoraTargetConfig(num_last_blocks=1, target_modules=["out_proj"]))
    assert out_only == ["model.transformer.resblocks.1.attn"]


@pytest.mark.parametrize("model_type", ["tiny-siglip2", "tiny-clip"])
def test_only_adapters_and_logits_train_and_merging_is_exact(model_type):
    model = create_model(model_type, pretrained=False).eval()  # eval: no LoRA dropout
    cfg = PeftConfig(
        enabled=True,
        vision=LoraTargetConfig(enabled=True, target_modules=["q_proj", "v_proj", "qkv"], num_last_blocks=0),
        text=LoraTargetConfig(enabled=True, target_modules=["out_proj", "qkv"], num_last_blocks=1),
    )
    counts = apply_lora(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "logit_" in n for n in trainable)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # adapters start at zero in B: make them non-trivial before comparing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pixels, ids = _inputs(model)
    with torch.no_grad():
        unmerged = model.encode_image(pixels), model.encode_text(ids)
        merge_lora(model)
        merged = model.encode_image(pixels), model.encode_text(ids)
    assert not any("lora" in n or "base_layer" in n for n in model.state_dict())
    # The merged model is the plain architecture again: its keys load into a fresh model of the type.
    create_model(model_type, pretrained=False).load_state_dict(model.state_dict())
    for a, b in zip(unmerged, merged):
        assert (a - b).abs().max() <= 1e-5


def test_lora_training_end_to_end(tiny_spec, tmp_path):
    """Train with LoRA from a start checkpoint; base weights stay, adapters move; evaluate and export merge."""
    start = tmp_path / "start.pth"
    torch.save({"model": create_model("tiny-siglip2", pretrained=False).state_dict()}, start)
    spec = tiny_spec("tiny-siglip2", peft=PEFT, train={"num_epochs": 1, "pretrained_model_path": str(start)})
    assert main(["train", "-e", str(spec), "wandb.enable=false"]) == 0
    cfg = load_experiment(spec)
    ckpt_path = f"{cfg.results_dir}/train/clip_latest.pth"
    saved = load_checkpoint(ckpt_path)["model"]
    original = torch.load(start, weights_only=True)["model"]
    base_key = "model.vision_model.encoder.layers.1.self_attn.q_proj"
    assert torch.equal(saved[f"{base_key}.base_layer.weight"], original[f"{base_key}.weight"])  # frozen
    assert saved[f"{base_key}.lora_B.default.weight"].abs().sum() > 0  # trained
    assert not torch.equal(saved["model.logit_scale"], original["model.logit_scale"])  # trains too
    assert "model.vision_model.encoder.layers.0.self_attn.q_proj.weight" in saved  # num_last_blocks=1

    # Unmerged (adapters live) vs what evaluate/export load (merged): same embeddings.
    live = create_model("tiny-siglip2", pretrained=False)
    apply_lora(live, cfg.peft)
    live.load_state_dict(saved)
    live.eval()
    merged = build_model(cfg, ckpt_path).eval()
    pixels, ids = _inputs(live)
    with torch.no_grad():
        assert (live.encode_image(pixels) - merged.encode_image(pixels)).abs().max() <= 1e-5
        assert (live.encode_text(ids) - merged.encode_text(ids)).abs().max() <= 1e-5

    onnx_file = tmp_path / "export" / "lora.onnx"
    assert main(["export", "-e", str(spec), f"export.checkpoint={ckpt_path}", f"export.onnx_file={onnx_file}"]) == 0
    graph = onnx.load(str(onnx_file)).graph
    names = [i.name for i in graph.initializer] + [n.name for n in graph.node]
    assert not any("lora" in n.lower() for n in names)


def test_lora_resume_is_exact(tiny_spec, tmp_path, capsys):
    """2 epochs straight vs resumed from the first epoch's checkpoint: the same adapters and weights."""
    spec = tiny_spec("tiny-clip", num_train=32, peft={**PEFT, "vision": {"enabled": True, "target_modules": ["qkv"]}})
    run = ["train", "-e", str(spec), "wandb.enable=false", "dataset.train.batch_size=8"]
    assert main([*run, f"results_dir={tmp_path}/a"]) == 0
    first = sorted((tmp_path / "a" / "train").glob("model_epoch_000_*.pth"))[0]
    assert main([*run, f"results_dir={tmp_path}/b", f"train.resume_training_checkpoint_path={first}"]) == 0
    a = load_checkpoint(f"{tmp_path}/a/train/clip_latest.pth")["model"]
    b = load_checkpoint(f"{tmp_path}/b/train/clip_latest.pth")["model"]
    assert a.keys() == b.keys() and any(".lora_A" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # Resuming a LoRA run without its peft section is one clear line.
    resume = [*run, f"results_dir={tmp_path}/c", f"train.resume_training_checkpoint_path={first}", "peft.enabled=false"]
    capsys.readouterr()
    assert main(resume) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with LoRA adapters, but peft.enabled=False" in err[0]


@pytest.mark.parametrize(
    ("peft", "model", "message"),
    [
        (
            {"enabled": True, "vision": {"enabled": True, "target_modules": ["nonexistent"]}},
            {},
            "peft.vision.target_modules=['nonexistent'] matches no module in the vision tower's blocks",
        ),
        (
            {"enabled": True, "train_logit_calibration": False},
            {},
            "peft.enabled=true leaves nothing to train: both towers are frozen and peft.train_logit_calibration=false",
        ),
    ],
)
def test_bad_peft_specs_are_one_line(tiny_spec, capsys, peft, model, message):
    spec = tiny_spec("tiny-siglip2", peft=peft, model={"type": "tiny-siglip2", **model})
    assert main(["train", "-e", str(spec), "wandb.enable=false"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _trainable(model, params):
    return {id(p) for p in params if p.requires_grad}


def test_tower_modes_override_the_freeze_flags_with_one_warning(caplog):
    """TAO 7.3's order: freeze all, then per tower frozen / full / lora; the logit calibration on its own switch."""
    model = create_model("tiny-siglip2", pretrained=False)
    cfg = PeftConfig(
        enabled=True,
        vision=LoraTargetConfig(mode="lora", num_last_blocks=1),
        text=LoraTargetConfig(mode="full"),
    )
    with caplog.at_level(logging.WARNING, logger="clip_tao.engine.lora"):
        counts = apply_lora(model, cfg, {"vision": True, "text": True})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "model.freeze_vision_encoder=true but peft.vision.mode=lora; model.freeze_text_encoder=true but "
        "peft.text.mode=full (with peft.enabled the tower modes decide, as in TAO 7.3)"
    ]
    vision = [(n, p) for n, p in model.named_parameters() if n.startswith("model.vision_model.")]
    assert {n for n, p in vision if p.requires_grad} == {n for n, _ in vision if ".lora_" in n}
    assert all(".layers.1." in n for n, p in vision if p.requires_grad)  # num_last_blocks=1
    assert all(p.requires_grad for p in model.text_parameters())  # full: the whole tower
    assert model.logit_scale.requires_grad and model.logit_bias.requires_grad
    assert counts["text"] == sum(p.numel() for p in model.text_parameters())
    assert counts["vision"] == sum(p.numel() for n, p in vision if ".lora_" in n) > 0
    assert counts["logit"] == 2 and counts["trainable"] == counts["vision"] + counts["text"] + 2
    line = describe(counts)
    assert f"vision (lora) {counts['vision']:,}, text (full) {counts['text']:,}, logit scale/bias 2" in line


def test_frozen_towers_leave_the_calibration_and_legacy_enabled_means_lora(caplog):
    model = create_model("tiny-siglip2", pretrained=False)
    with caplog.at_level(logging.WARNING, logger="clip_tao.engine.lora"):
        counts = apply_lora(model, PeftConfig(enabled=True), {"vision": False, "text": False})
    # Both towers frozen although the freeze flags say train: one warning names both.
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"model.logit_scale", "model.logit_bias"}
    assert (counts["vision"], counts["text"], counts["logit"]) == (0, 0, 2)
    # 7.2's form: enabled true is lora, calibration off keeps the logit parameters frozen.
    model = create_model("tiny-siglip2", pretrained=False)
    legacy = PeftConfig(
        enabled=True, train_logit_calibration=False, text=LoraTargetConfig(enabled=True, num_last_blocks=1)
    )
    counts = apply_lora(model, legacy)
    assert counts["modes"] == {"vision": "frozen", "text": "lora"}
    assert not model.logit_scale.requires_grad and counts["logit"] == 0 and counts["text"] > 0
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_config_error_type():
    model = create_model("tiny-siglip2", pretrained=False)
    with pytest.raises(ConfigError):
        lora_targets(model, "vision", LoraTargetConfig(target_modules=["nope"]))


def test_lora_and_regularisation_under_ddp(tiny_spec, tmp_path):
    """Two real processes (gloo): adapters train, the base stays, each rank's teacher adds its terms."""
    import json

    from tests.test_distributed import torchrun

    start = tmp_path / "start.pth"
    torch.save({"model": create_model("tiny-clip", pretrained=False).state_dict()}, start)
    peft = {"enabled": True, "vision": {"enabled": True, "target_modules": ["qkv"]}, "text": {"enabled": True}}
    spec = tiny_spec(
        "tiny-clip",
        num_train=32,
        peft=peft,
        regularization={"enabled": True},
        wandb={"enable": False},
        train={"num_epochs": 1, "pretrained_model_path": str(start), "optim": {"warmup_steps": 1}},
    )
    torchrun("-m", "clip_tao", "train", "-e", str(spec), "dataset.train.batch_size=8")
    train = tmp_path / "results" / "train"
    saved = load_checkpoint(str(train / "clip_latest.pth"))
    assert saved["world_size"] == 2
    original = torch.load(start, weights_only=True)["model"]
    # The fused attention's weights carry a low-rank delta; the stored base is exactly the start's.
    fused = "model.visual.transformer.resblocks.1.attn.parametrizations.in_proj_weight"
    base = saved["model"][f"{fused}.original"]
    assert torch.equal(base, original["model.visual.transformer.resblocks.1.attn.in_proj_weight"])
    assert saved["model"][f"{fused}.0.lora_B"].abs().sum() > 0
    lines = [json.loads(line) for line in (train / "status.json").read_text().splitlines()]
    kpi = next(line["kpi"] for line in lines if line["status"] == "RUNNING")
    assert kpi["reg_cosine"] > 0 and kpi["reg_similarity"] > 0

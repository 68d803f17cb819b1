import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_tao.config.schema import OptimConfig
from clip_tao.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from clip_tao.engine.optim import build_optimizer, lr_factor, parameter_groups
from clip_tao.errors import ModelError
from clip_tao.io.atomic import write_json
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model


def _batch(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_sigmoid_loss_matches_definition():
    image, text = _batch()
    scale, bias = torch.tensor(math.log(10)), torch.tensor(-10.0)
    logits = image @ text.T * 10 - 10
    labels = 2 * torch.eye(6) - 1
    want = -F.logsigmoid(labels * logits).sum() / 6
    torch.testing.assert_close(ContrastiveLoss("siglip")(image, text, scale, bias), want)


def test_softmax_loss_matches_definition():
    image, text = _batch()
    scale = torch.tensor(math.log(1 / 0.07))
    logits = image @ text.T / 0.07
    target = torch.arange(6)
    want = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(ContrastiveLoss("clip")(image, text, scale, torch.tensor(0.0)), want)


def test_parameter_groups_split_lr_and_decay():
    model = create_model("tiny-clip", pretrained=False)
    optim = OptimConfig(vision_lr=1e-3, text_lr=1e-5, weight_decay=0.1)
    groups = {g["name"]: g for g in parameter_groups(model, optim)}
    assert set(groups) == {"vision_decay", "vision_no_decay", "text_decay", "text_no_decay"}
    assert groups["vision_decay"]["lr"] == 1e-3 and groups["text_decay"]["lr"] == 1e-5
    assert groups["vision_no_decay"]["weight_decay"] == 0.0 and groups["text_decay"]["weight_decay"] == 0.1
    assert all(p.ndim >= 2 for p in groups["vision_decay"]["params"])
    no_decay_text = {id(p) for p in groups["text_no_decay"]["params"]}
    assert id(model.logit_scale) in no_decay_text and id(model.logit_bias) in no_decay_text  # follow text_lr
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_frozen_tower_is_left_out():
    model = create_model("tiny-siglip2", pretrained=False)
    for p in model.vision_parameters():
        p.requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig())
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["text_decay", "text_no_decay"]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    factors = [lr_factor(step, 100, 10, kind) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    if kind == "constant":
        assert factors[-1] == 1.0
    else:
        assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.03
        assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_checkpoint_loads_with_weights_only_and_rng_round_trips(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    path = tmp_path / "ckpt.pth"
    save_checkpoint(str(path), {"rng": state, "config": {"a": [1, 2]}, "epoch": 3})
    loaded = load_checkpoint(str(path))  # weights_only=True inside
    assert loaded["epoch"] == 3 and loaded["config"] == {"a": [1, 2]}
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_foreign_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": OptimConfig()}, path)  # an arbitrary Python object, not plain data
    with pytest.raises(ModelError, match="cannot be read safely"):
        load_checkpoint(str(path))


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert path.read_text().strip().startswith("{") and '"ok": 1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_safetensors_and_namespace_checkpoints_load(tmp_path):
    import argparse

    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_checkpoint(str(tmp_path / "w.safetensors"))["w"], torch.ones(2))
    # RADIO's layout: its training arguments as an argparse.Namespace beside the weights.
    torch.save({"args": argparse.Namespace(model="vit"), "state_dict": {"w": torch.zeros(1)}}, tmp_path / "r.pth.tar")
    assert load_checkpoint(str(tmp_path / "r.pth.tar"))["args"].model == "vit"

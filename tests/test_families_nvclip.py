"""NV-CLIP (open_clip SigLIP-CLIPA layout) offline fidelity against open_clip's own model and tokenizer.

A tiny config with NV-CLIP's features (sin-cos 2-d position embedding, CLIPA pooling, no causal mask,
BERT-uncased tokenizer with [SEP] stripped) is registered in open_clip as TAO does, so the reference
is ``open_clip.create_model_and_transforms`` + ``open_clip.get_tokenizer`` on the very same files.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from clip_tao.engine.weights import load_weights
from clip_tao.errors import ModelError
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import add_model_config, create_model
from clip_tao.models.tokenizer import load_tokenizer
from tests.family_assets import TINY_NVCLIP, make_bert_vocab, make_openclip_folder

TYPE = "ViT-L-14-SigLIP-CLIPA-224"
TEXTS = ["A photo of a Dog.", "two cats sleeping on a red sofa", "an image of people walking"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("nvclip")
    make_bert_vocab(root / "bert")
    folder = root / "hub"
    clip = make_openclip_folder(folder, TINY_NVCLIP, root / "bert")
    # Register the tiny config in open_clip the way TAO registers NV-CLIP's (the reference side).
    reference_cfg = json.loads(json.dumps(TINY_NVCLIP))
    reference_cfg["text_cfg"].update(hf_tokenizer_name=str(root / "bert"), tokenizer_kwargs={"strip_sep_token": True})
    reference_cfg["init_logit_bias"] = -10.0
    (root / "tiny-nvclip-reference.json").write_text(json.dumps(reference_cfg))
    open_clip.add_model_config(root / "tiny-nvclip-reference.json")
    # And as a clip-tao type whose tokenizer is the local BERT folder.
    info = json.loads(json.dumps(TINY_NVCLIP))
    info.update(init_logit_bias=-10.0, tokenizer="hf", tokenizer_id=str(root / "bert"), strip_sep_token=True)
    add_model_config(
        {"family": "openclip", "image_size": 28, "embed_dim": 32, "context_length": 16, "config": info},
        name="test-tiny-nvclip",
    )
    return {"root": root, "folder": str(folder), "clip": clip, "bert": str(root / "bert")}


def _reference(assets, weights):
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms("tiny-nvclip-reference", pretrained=weights)
    return model.eval(), open_clip.get_tokenizer("tiny-nvclip-reference")


def test_open_clip_folder_through_the_real_type_equals_open_clip(assets):
    model = create_model(TYPE, pretrained_path=assets["folder"]).eval()
    reference, reference_tokenizer = _reference(assets, f"{assets['folder']}/open_clip_pytorch_model.bin")
    ids = model.tokenizer(TEXTS)
    assert torch.equal(ids, reference_tokenizer(TEXTS))
    assert ids.shape == (3, 16) and not (ids == 3).any()  # [SEP] (id 3) stripped, as open_clip does for CLIPA
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pixels), reference.encode_image(pixels, normalize=True), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            model.encode_text(ids), reference.encode_text(ids, normalize=True), atol=1e-5, rtol=1e-5
        )
    assert model.logit_scale.item() == pytest.approx(3.0) and model.logit_bias.item() == pytest.approx(-10.0)


@pytest.mark.parametrize("layout", ["safetensors", "state_dict_module_prefix"])
def test_weight_files_load_through_pretrained_path(assets, tmp_path, layout):
    state = assets["clip"].state_dict()
    if layout == "safetensors":
        path = tmp_path / "nvclip.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "nvclip.ckpt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_model("test-tiny-nvclip", pretrained_path=str(path))
    for key, value in state.items():
        assert torch.equal(model.model.state_dict()[key], value), key


def test_an_open_clip_checkpoint_works_as_train_pretrained_model_path(assets, tmp_path):
    """TAO users give the NV-CLIP checkpoint as train.pretrained_model_path: the engine's loader accepts it."""
    path = tmp_path / "nvclip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in assets["clip"].state_dict().items()}}, path)
    model = create_model("test-tiny-nvclip", pretrained=False)
    load_weights(model, str(path))
    for key, value in assets["clip"].state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key


def test_random_init_has_nvclip_logit_bias_and_sincos_position_embedding(assets):
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    model = create_model("test-tiny-nvclip", pretrained=False)
    assert model.logit_bias.item() == pytest.approx(-10.0)
    expected = torch.from_numpy(get_2d_sincos_pos_embed(32, 2, cls_token=True)).float()
    torch.testing.assert_close(model.model.visual.positional_embedding, expected)


@pytest.mark.parametrize("loss_type", ["siglip", "clip"])
def test_training_step_and_state_dict_round_trip(assets, loss_type, tmp_path):
    model = create_model(TYPE, pretrained_path=assets["folder"], loss_type=loss_type)
    model.train()
    model.set_grad_checkpointing(True)
    image, text = model(torch.randn(4, 3, 28, 28), model.tokenizer(["a", "b", "c", "d"]))
    loss = ContrastiveLoss(loss_type)(image, text, model.logit_scale, model.logit_bias)
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert torch.isfinite(loss)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = create_model(TYPE, pretrained_path=assets["folder"])
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_tokenizer_round_trips_and_tokenizer_path(assets, tmp_path):
    tokenizer = create_model("test-tiny-nvclip", pretrained=False, tokenizer_path=assets["bert"]).tokenizer
    tokenizer.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert torch.equal(tokenizer(TEXTS), again(TEXTS)) and again.context_length == 16


def test_missing_tokenizer_or_weights_are_one_clear_error(assets, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelError, match=r"tokenizer 'bert-base-uncased' is not reachable.*model.tokenizer_path"):
        create_model(TYPE, pretrained=False)
    with pytest.raises(ModelError, match="without open_clip_config.json"):
        create_model(TYPE, pretrained_path=str(tmp_path))

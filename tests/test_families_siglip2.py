"""SigLIP2 offline fidelity: a tiny ``SiglipModel`` + Gemma tokenizer, published the way Google's are.

Loaded back through ``model.type=siglip2-so400m-patch16-256`` + a local folder, and through the HF cache
with ``HF_HUB_OFFLINE=1``; compared with transformers' own forward and with sentencepiece's own ids.
"""

from __future__ import annotations

import pytest
import torch

from clip_tao.errors import ModelError
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model
from clip_tao.models.tokenizer import load_tokenizer
from tests.family_assets import make_gemma_tokenizer, make_siglip_folder

TYPE = "siglip2-so400m-patch16-256"
TEXTS = ["A photo of a DOG!", "two cats, sleeping on a red sofa", "zebra"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip2")
    spm_model = make_gemma_tokenizer(root / "gemma")
    make_siglip_folder(root / "model", root / "gemma")
    return {"root": root, "spm": spm_model, "folder": str(root / "model")}


def test_embeddings_equal_transformers_forward(assets):
    from transformers import SiglipModel

    model = create_model(TYPE, pretrained_path=assets["folder"]).eval()
    reference = SiglipModel.from_pretrained(assets["folder"]).eval()
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    ids = model.tokenizer(TEXTS)
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels)
        torch.testing.assert_close(model.encode_image(pixels), out.image_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(ids), out.text_embeds, atol=1e-5, rtol=1e-5)
    # The published scale and bias come with the weights (no re-initialisation).
    assert model.logit_scale.item() == pytest.approx(2.5) and model.logit_bias.item() == pytest.approx(-7.0)
    # Pre-processing is the model's own: its size from the weights, SigLIP's 0.5 mean/std, squash resize.
    assert model.image_size == 32 and model.preprocess.mean == (0.5, 0.5, 0.5)
    assert model.preprocess.resize_mode == "squash" and model.preprocess.interpolation == "bilinear"


def test_tokenization_is_gemma_sentencepiece_canonicalised(assets):
    import sentencepiece as spm

    tokenizer = create_model(TYPE, pretrained_path=assets["folder"]).tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(assets["spm"]))
    ids = tokenizer(TEXTS)
    assert ids.shape == (3, 64) and ids.dtype == torch.long
    for row, text in zip(ids, ["a photo of a dog", "two cats sleeping on a red sofa", "zebra"]):
        # Lower case, no punctuation; no BOS; EOS (1) appended; padded with 0 to 64.
        expected = sp.encode(text) + [1]
        expected += [0] * (64 - len(expected))
        assert row.tolist() == expected


def test_tokenizer_round_trips_through_a_folder(assets, tmp_path):
    tokenizer = create_model(TYPE, pretrained_path=assets["folder"]).tokenizer
    tokenizer.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert torch.equal(tokenizer(TEXTS), again(TEXTS)) and again.context_length == 64 and again.canonicalize


@pytest.mark.parametrize("loss_type", ["siglip", "clip"])
def test_training_step_and_state_dict_round_trip(assets, loss_type, tmp_path):
    model = create_model(TYPE, pretrained_path=assets["folder"], loss_type=loss_type)
    model.train()
    model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    image, text = model(torch.randn(4, 3, 32, 32), model.tokenizer(["a", "b", "c", "d"]))
    loss = ContrastiveLoss(loss_type)(image, text, model.logit_scale, model.logit_bias)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = create_model(TYPE, pretrained_path=assets["folder"])
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_image_size_override_interpolates_position_embeddings(assets):
    from transformers import SiglipModel

    model = create_model(TYPE, pretrained_path=assets["folder"], image_size=48).eval()
    reference = SiglipModel.from_pretrained(assets["folder"]).eval()
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = reference.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
        torch.testing.assert_close(model.image_features(pixels), expected)
    assert model.image_size == 48


def _hub_cache(monkeypatch, cache):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_loads_from_the_cache_offline(assets, tmp_path, monkeypatch):
    """What `hf download google/siglip2-so400m-patch16-256` leaves in the cache, read offline."""
    import shutil

    repo = tmp_path / "cache" / "models--google--siglip2-so400m-patch16-256"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    shutil.copytree(assets["folder"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _hub_cache(monkeypatch, tmp_path / "cache")
    model = create_model(TYPE).eval()
    local = create_model(TYPE, pretrained_path=assets["folder"]).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), local.encode_image(pixels))
    assert torch.equal(model.tokenizer(TEXTS), local.tokenizer(TEXTS))


def test_unreachable_weights_are_one_clear_error(tmp_path, monkeypatch):
    _hub_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(ModelError, match=r"`hf download google/siglip2-so400m-patch16-256`.*pretrained_path"):
        create_model(TYPE)
    with pytest.raises(ModelError, match="is not a folder"):
        create_model(TYPE, pretrained_path=str(tmp_path / "nothing"))

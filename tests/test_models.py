import math

import pytest
import torch

from clip_tao.errors import ModelError
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model, list_models
from clip_tao.models.tokenizer import canonicalize_text

# Tiny types only: the real families are tested offline in tests/test_families_*.py.
ALL_TYPES = [info.name for info in list_models("tiny-*")]


def test_tiny_types_are_registered():
    assert {"tiny-clip", "tiny-siglip2"} <= set(ALL_TYPES)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_forward_backward_and_interface(model_type):
    model = create_model(model_type, pretrained=False)
    size = model.image_size
    pixels = torch.randn(3, 3, size, size)
    ids = model.tokenizer(["a red square", "a blue circle", "a green cross"])
    assert ids.shape == (3, model.context_length) and ids.dtype == torch.long
    image, text = model(pixels, ids)
    assert image.shape == text.shape == (3, model.embed_dim)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    loss = ContrastiveLoss("siglip")(image, text, model.logit_scale, model.logit_bias)
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_bias.grad is not None
    # The two towers and the logit parameters partition the model's parameters.
    vision = {id(p) for p in model.vision_parameters()}
    text_ids = {id(p) for p in model.text_parameters()}
    logits = {id(p) for p in model.logit_parameters()}
    assert not vision & text_ids and not (vision | text_ids) & logits
    assert vision | text_ids | logits == {id(p) for p in model.parameters()}
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_grad_checkpointing_gives_the_same_gradients(model_type):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model = create_model(model_type, pretrained=False)
        model.set_grad_checkpointing(enable)
        model.train()
        ids = model.tokenizer(["one", "two"])
        image, text = model(pixels, ids)
        (image * text).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("loss_type", "scale", "bias"), [("siglip", math.log(10), -10.0), ("clip", math.log(1 / 0.07), 0.0)]
)
def test_logit_init_follows_loss_type(loss_type, scale, bias):
    model = create_model("tiny-siglip2", pretrained=False, loss_type=loss_type)
    assert model.logit_scale.item() == pytest.approx(scale, rel=1e-6)
    assert model.logit_bias.item() == pytest.approx(bias)
    model = create_model("tiny-clip", pretrained=False, loss_type=loss_type, init_logit_scale=1.5, init_logit_bias=-3)
    assert model.logit_scale.item() == pytest.approx(1.5) and model.logit_bias.item() == pytest.approx(-3)


def test_default_weights_are_deterministic():
    a = create_model("tiny-clip").state_dict()
    b = create_model("tiny-clip").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_image_size_override_and_refusal():
    model = create_model("tiny-clip", pretrained=False, image_size=96)
    assert model.image_size == 96
    assert model.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 64)
    with pytest.raises(ModelError, match="multiple of its patch size 8"):
        create_model("tiny-siglip2", pretrained=False, image_size=70)


def test_unknown_type_suggests_the_nearest():
    with pytest.raises(ModelError, match="did you mean tiny-clip"):
        create_model("tiny-clp")


def test_canonicalized_tokenization():
    assert canonicalize_text("  A Dog,   running!  ") == "a dog running"
    model = create_model("tiny-siglip2", pretrained=False, canonicalize_text=True)
    assert torch.equal(model.tokenizer("A Dog, running!"), model.tokenizer("a dog running"))


def test_openclip_state_dict_loads_through_pretrained_path(tmp_path):
    source = create_model("tiny-clip", pretrained=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.model.state_dict().items()}}, tmp_path / "w.pt")
    loaded = create_model("tiny-clip", pretrained_path=str(tmp_path / "w.pt"))
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_siglip_save_pretrained_folder_loads(tmp_path):
    source = create_model("tiny-siglip2", pretrained=False)
    source.model.save_pretrained(tmp_path / "hf")
    loaded = create_model("tiny-siglip2", pretrained_path=str(tmp_path / "hf"))
    pixels = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(source.encode_image(pixels), loaded.encode_image(pixels))


def test_missing_weight_file_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        create_model("tiny-clip", pretrained_path=str(tmp_path / "none.pt"))


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_tokenizer_round_trips_through_a_folder(model_type, tmp_path):
    from clip_tao.models.tokenizer import load_tokenizer

    tokenizer = create_model(model_type, pretrained=False, canonicalize_text=True).tokenizer
    tokenizer.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    texts = ["A photo of a DOG!", "two cats, sleeping"]
    assert torch.equal(tokenizer(texts), again(texts)) and again.context_length == tokenizer.context_length

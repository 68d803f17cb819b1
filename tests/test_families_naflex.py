"""SigLIP2 NaFlex offline fidelity: a tiny ``Siglip2Model`` saved with ``save_pretrained``, loaded through
``model.type=siglip2-so400m-patch16-naflex``, equals transformers' forward on inputs built with transformers'
own NaFlex patchify and padding helpers — for a fixed batch and for a padded batch of different sizes."""

from __future__ import annotations

import pytest
import torch

from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model
from tests.family_assets import GEMMA_SPECIAL_IDS, TINY_SIGLIP_TEXT, make_gemma_tokenizer

TYPE = "siglip2-so400m-patch16-naflex"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import AutoTokenizer, Siglip2Config, Siglip2Model

    root = tmp_path_factory.mktemp("naflex")
    make_gemma_tokenizer(root / "gemma")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "gemma"))
    text = {**TINY_SIGLIP_TEXT, **GEMMA_SPECIAL_IDS, "vocab_size": len(tokenizer), "max_position_embeddings": 64}
    vision = {**TINY_SIGLIP_TEXT, "patch_size": 8, "num_patches": 16}  # a 4x4 position-embedding grid
    torch.manual_seed(4)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    model.save_pretrained(str(root / "model"))
    tokenizer.save_pretrained(str(root / "model"))
    return str(root / "model")


def _reference_inputs(images: list[torch.Tensor], patch: int):
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches, pad_along_first_dim

    sequences = [convert_image_to_patches(image, patch) for image in images]
    longest = max(s.shape[0] for s in sequences)
    padded = [pad_along_first_dim(s, longest) for s in sequences]
    values = torch.stack([p for p, _ in padded])
    mask = torch.stack([m for _, m in padded])
    shapes = torch.tensor([[image.shape[1] // patch, image.shape[2] // patch] for image in images])
    return values, mask, shapes


def test_fixed_and_padded_batches_equal_transformers_forward(folder):
    from transformers import Siglip2Model

    model = create_model(TYPE, pretrained_path=folder, image_size=32).eval()
    reference = Siglip2Model.from_pretrained(folder).eval()
    torch.manual_seed(0)
    canvas = torch.randn(2, 3, 32, 32)
    ids = model.tokenizer(["A dog!", "two cats"])
    with torch.no_grad():
        values, mask, shapes = _reference_inputs(list(canvas), 8)
        out = reference(input_ids=ids, pixel_values=values, pixel_attention_mask=mask, spatial_shapes=shapes)
        torch.testing.assert_close(model.encode_image(canvas), out.image_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(ids), out.text_embeds, atol=1e-5, rtol=1e-5)
        # A 24x32 image padded onto the 32x32 canvas: only its own patches count.
        sizes = torch.tensor([[24, 32], [32, 32]])
        values, mask, shapes = _reference_inputs([canvas[0, :, :24, :], canvas[1]], 8)
        expected = reference.get_image_features(pixel_values=values, pixel_attention_mask=mask, spatial_shapes=shapes)
        expected = getattr(expected, "pooler_output", expected)
        ours = model.encode_image(canvas, image_sizes=sizes)
        torch.testing.assert_close(ours, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)
        alone = model.encode_image(canvas[:1, :, :24, :])
        torch.testing.assert_close(ours[:1], alone, atol=1e-5, rtol=1e-5)
    assert not model.exportable and model.context_length == 64


@pytest.mark.parametrize("loss_type", ["siglip", "clip"])
def test_training_step_and_state_dict_round_trip(folder, loss_type, tmp_path):
    model = create_model(TYPE, pretrained_path=folder, image_size=32, loss_type=loss_type)
    model.train()
    model.set_grad_checkpointing(True)
    image, text = model(
        torch.randn(4, 3, 32, 32),
        model.tokenizer(["a", "b", "c", "d"]),
        torch.tensor([[32, 32], [16, 32], [32, 24], [8, 8]]),
    )
    loss = ContrastiveLoss(loss_type)(image, text, model.logit_scale, model.logit_bias)
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert torch.isfinite(loss)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = create_model(TYPE, pretrained_path=folder, image_size=32)
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_variable_size_batch_helpers(folder):
    from clip_tao.models.naflex_family import naflex_image_size, pad_to_canvas

    # The processor's patch budget: aspect ratio kept, multiples of 16, at most 256 patches.
    height, width = naflex_image_size(480, 640)
    assert height % 16 == width % 16 == 0 and (height // 16) * (width // 16) <= 256 and width > height
    model = create_model(TYPE, pretrained_path=folder, image_size=32).eval()
    images = [torch.randn(3, 16, 32), torch.randn(3, 32, 24)]
    canvas, sizes = pad_to_canvas(images)
    assert canvas.shape == (2, 3, 32, 32) and sizes.tolist() == [[16, 32], [32, 24]]
    with torch.no_grad():
        batched = model.encode_image(canvas, sizes)
        for i, image in enumerate(images):
            torch.testing.assert_close(batched[i], model.encode_image(image[None])[0], atol=1e-5, rtol=1e-5)

"""SigLIP2 NaFlex against transformers: a tiny ``Siglip2Model`` saved with ``save_pretrained``, loaded through
``model.type=siglip2-so400m-patch16-naflex``. Pixels, masks and grid shapes come out of our data pipeline
equal to ``Siglip2ImageProcessor``'s, and embeddings equal ``Siglip2Model``'s on the processor's output."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from clip_tao.data.naflex import batch_stacker
from clip_tao.data.transforms import build_eval_transform
from clip_tao.data.wds import open_rgb
from clip_tao.errors import ConfigError
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model
from clip_tao.models.base import Preprocess
from clip_tao.models.patches import PatchBatch, PatchBudgetError, naflex_image_size, patch_batch
from tests.family_assets import make_gemma_tokenizer, make_naflex_folder

TYPE = "siglip2-so400m-patch16-naflex"
# (width, height): portrait, landscape, a 1x8 strip, a tiny image, a square, a 1-pixel-high line.
SIZES = [(60, 170), (300, 110), (24, 192), (5, 3), (64, 64), (97, 1)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("naflex")
    make_gemma_tokenizer(root / "gemma")
    return str(make_naflex_folder(root / "model", root / "gemma"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Noise images of several aspect ratios, written as PNG and decoded as the loaders decode them."""
    root = tmp_path_factory.mktemp("shapes")
    generator = torch.Generator().manual_seed(0)
    decoded = []
    for i, (width, height) in enumerate(SIZES):
        array = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(array).save(root / f"{i}.png")
        decoded.append(open_rgb(str(root / f"{i}.png")))
    return decoded


def _ours(preprocess: Preprocess, images, pad_to=None) -> PatchBatch:
    transform = build_eval_transform(preprocess)
    return batch_stacker(preprocess, pad_to=pad_to)([transform(image) for image in images])


def test_pixels_mask_and_shapes_equal_the_processor(images):
    from transformers import Siglip2ImageProcessor

    from clip_tao.models.base import preprocess_from_config
    from clip_tao.models.naflex_family import DEFAULT_MAX_NUM_PATCHES
    from clip_tao.models.registry import get_model_info

    processor = Siglip2ImageProcessor()  # the published model's settings
    # The real type's pre-processing (its JSON config), without building the 1.1 B-parameter model.
    info = get_model_info(TYPE)
    preprocess = dataclasses.replace(
        preprocess_from_config(info.config, info.image_size),
        patch_size=info.config["vision_config"]["patch_size"],
        max_num_patches=DEFAULT_MAX_NUM_PATCHES,
    )
    assert (preprocess.patch_size, preprocess.max_num_patches) == (processor.patch_size, processor.max_num_patches)
    assert list(preprocess.mean) == list(processor.image_mean) and list(preprocess.std) == list(processor.image_std)
    assert preprocess.interpolation == "bilinear" and processor.resample.name == "BILINEAR"
    for budget in (256, 64):
        expected = processor(images, max_num_patches=budget, return_tensors="pt")
        ours = _ours(dataclasses.replace(preprocess, max_num_patches=budget), images, budget)
        assert torch.equal(ours.pixel_values, expected["pixel_values"])
        assert torch.equal(ours.pixel_attention_mask, expected["pixel_attention_mask"])
        assert torch.equal(ours.spatial_shapes, expected["spatial_shapes"])
    shapes = ours.spatial_shapes.tolist()
    # Portrait stays portrait, landscape landscape; the 5x3 image is enlarged to fill the budget (6x10).
    assert shapes[0][0] > shapes[0][1] and shapes[1][0] < shapes[1][1] and shapes[3] == [6, 10] and shapes[5][0] == 1
    # Padded to the batch's longest sequence instead of the budget: the same patches, less padding.
    short = _ours(preprocess, images)
    assert short.num_patches == int(short.pixel_attention_mask.sum(1).max()) <= 256


def test_embeddings_equal_siglip2_on_the_processor_output(folder, images):
    from transformers import Siglip2ImageProcessor, Siglip2Model

    model = create_model(TYPE, pretrained_path=folder, max_num_patches=48).eval()
    assert (model.preprocess.patch_size, model.preprocess.max_num_patches) == (8, 48)
    reference = Siglip2Model.from_pretrained(folder).eval()
    inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=48)(images, return_tensors="pt")
    ids = model.tokenizer(["A dog!", "two cats"])
    with torch.no_grad():
        out = reference(input_ids=ids, **inputs)
        expected = torch.nn.functional.normalize(out.vision_model_output.pooler_output, dim=-1)
        batch = _ours(model.preprocess, images)
        torch.testing.assert_close(model.encode_image(batch), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(ids), out.text_embeds, atol=1e-5, rtol=1e-5)
        # Each image alone (no padding at all) gives the same embedding as in the padded batch.
        alone = torch.cat([model.encode_image(_ours(model.preprocess, [image])) for image in images])
        torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)
        # A plain [B, 3, H, W] batch is one grid of H/p x W/p patches.
        square = torch.randn(2, 3, 24, 40)
        torch.testing.assert_close(
            model.encode_image(square), model.encode_image(patch_batch(list(square), 8)), atol=1e-6, rtol=1e-6
        )


def test_evaluation_budget_may_differ_from_training(folder, images):
    """The position table (4x4 here) is resized to each grid, so any budget works with the same weights."""
    from transformers import Siglip2ImageProcessor, Siglip2Model

    reference = Siglip2Model.from_pretrained(folder).eval()
    for budget in (4, 200):
        model = create_model(TYPE, pretrained_path=folder, max_num_patches=budget).eval()
        inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=budget)(images, return_tensors="pt")
        with torch.no_grad():
            expected = reference.get_image_features(**inputs)
            expected = torch.nn.functional.normalize(getattr(expected, "pooler_output", expected), dim=-1)
            torch.testing.assert_close(
                model.encode_image(_ours(model.preprocess, images)), expected, atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("loss_type", ["siglip", "clip"])
def test_training_step_and_state_dict_round_trip(folder, loss_type, tmp_path, images):
    model = create_model(TYPE, pretrained_path=folder, loss_type=loss_type, max_num_patches=32)
    model.train()
    model.set_grad_checkpointing(True)
    image, text = model(_ours(model.preprocess, images[:4]), model.tokenizer(["a", "b", "c", "d"]))
    loss = ContrastiveLoss(loss_type)(image, text, model.logit_scale, model.logit_bias)
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert torch.isfinite(loss)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = create_model(TYPE, pretrained_path=folder)
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_patch_batch_behaves_like_a_batch_tensor():
    batch = patch_batch([torch.randn(3, 16, 32), torch.randn(3, 32, 24), torch.randn(3, 8, 8)], 8)
    assert len(batch) == 3 and batch.num_patches == 12 and batch.pixel_values.shape == (3, 12, 192)
    assert batch.pixel_attention_mask.sum(1).tolist() == [8, 12, 1]
    assert batch.spatial_shapes.tolist() == [[2, 4], [4, 3], [1, 1]]
    head = batch[:2]
    assert len(head) == 2 and torch.equal(head.pixel_values, batch.pixel_values[:2])
    moved = batch.to("cpu", non_blocking=True)
    assert moved.pixel_attention_mask.dtype == torch.int32 and moved.spatial_shapes.dtype == torch.long
    assert batch.padding_fraction() == pytest.approx(1 - 21 / 36)


def test_bad_budgets_and_images_are_one_line_errors(folder):
    for bad in (0, -3, 16 * 64 + 1):
        with pytest.raises(ConfigError, match=r"model.max_num_patches=.* must be an integer in \[1, 1024\]"):
            create_model(TYPE, pretrained_path=folder, max_num_patches=bad)
    with pytest.raises(ConfigError, match="model.max_num_patches is for NaFlex types"):
        create_model("tiny-clip", pretrained=False, max_num_patches=64)
    # Every image gets at least one patch a side (the processor rounds up); only an image more elongated
    # than the budget allows even at its smallest scale is refused, and the loaders skip and count it.
    assert naflex_image_size(1, 3, 16, 1) == (16, 16)
    with pytest.raises(PatchBudgetError, match=r"too elongated for max_num_patches=4 .*raise the budget"):
        naflex_image_size(1, 10**8, 16, 4)

"""Radio-CLIP against RADIO's own algorithm, from files laid out as RADIO writes them.

The checkpoints are tiny but key for key what RADIO's ``create_model_from_args`` + trainer save
(torch.hub ``{args, state_dict, state_dict_ema}``) and what its ``hf_hub.py`` exports (``config.json`` +
``model.safetensors``); see ``tests/family_assets.py``. The expected embeddings come from
:func:`radio_reference`, which follows RADIO's code step by step from the raw tensors, using only timm's
``VisionTransformer`` blocks: ``Im2Patches`` (channel, y, x order) + bias-free ``ViTPatchLinear``;
``ViTPatchGenerator._get_pos_embeddings`` in eval (bilinear, ``align_corners=False``, resize to a square of
the larger side, crop top-left); ``ClsToken`` (class tokens + registers first); the blocks; no final norm
(``create_model_from_args`` without ``model_norm``); the summary at ``token_slot``; then ``MLP`` (v1) or
``MLP2`` (v2) of ``adaptor_mlp.py`` in float32. clip-tao's model is timm's NaFlexVit RADIO port instead.
"""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from clip_tao.errors import ModelError
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model
from clip_tao.models.radio_adaptors import resolve_adaptor
from clip_tao.models.registry import get_model_info
from tests.family_assets import (
    RADIO_TEACHERS,
    RADIO_TINY_VIT,
    TINY_NVCLIP,
    make_gemma_tokenizer,
    make_openclip_folder,
    make_radio_checkpoint,
    make_radio_hf_folder,
    make_siglip_folder,
    radio_args,
)

CLIP_INDEX, SIGLIP_INDEX = 0, 1  # positions in family_assets.RADIO_TEACHERS
SIZES = [(128, 128), (64, 64), (96, 160)]  # the 8x8 CPE grid's native size, a smaller square, a non-square


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("radio")
    make_gemma_tokenizer(root / "gemma")
    make_siglip_folder(root / "siglip", root / "gemma")
    clip_cfg = {
        **TINY_NVCLIP,
        "embed_dim": 24,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    make_openclip_folder(root / "dfn", clip_cfg, None)
    # The clip teacher's head maps to the DFN text width 24; the siglip head to the tiny SigLIP width 32.
    state = make_radio_checkpoint(root / "c-radio.pth.tar", {CLIP_INDEX: 24, SIGLIP_INDEX: 32})
    make_radio_hf_folder(root / "hf", state, ["clip", "siglip2-g"])
    return {"root": root, "state": state}


def _text_source(assets, adaptor):
    return str(assets["root"] / ("dfn" if adaptor in ("clip", "dfn", "dfn_clip") else "siglip"))


def _build(assets, adaptor, weights="c-radio.pth.tar", model_type="c-radio_v3-b", **kw):
    return create_model(
        model_type,
        pretrained_path=str(assets["root"] / weights),
        adaptor_name=adaptor,
        text_pretrained_path=_text_source(assets, adaptor),
        **kw,
    )


def radio_training_positions(grid, batch, rows, cols, pos_dropout=0.1):
    """``ViTPatchGenerator.get_pos_enc`` + ``apply_pos_enc`` in training mode (CPE): a random window per image
    (scale, aspect, offset drawn in RADIO's order) sampled with ``grid_sample``, then per-image dropout."""
    import math

    if (rows, cols) == tuple(grid.shape[-2:]):
        pos = grid.flatten(2).transpose(1, 2)
    else:
        min_scale = math.sqrt(0.1)
        scale = torch.rand(batch, 1, 1) * (1 - min_scale) + min_scale
        aspect_min = math.log(3 / 4)
        aspect = torch.exp(torch.rand(batch, 1, 1) * (-aspect_min - aspect_min) + aspect_min)
        scale_xy = torch.stack([scale * aspect, scale * (1 / aspect)], dim=-1).clamp_(0, 1)
        pos_xy = torch.rand(batch, 1, 1, 2) * (1 - scale_xy)
        lin_x = torch.linspace(0, 1, steps=cols)[None, None].expand(batch, rows, -1)
        lin_y = torch.linspace(0, 1, steps=rows)[None, :, None].expand(batch, -1, cols)
        grid_xy = (torch.stack([lin_x, lin_y], dim=-1) * scale_xy + pos_xy).mul_(2).sub_(1)
        pos = F.grid_sample(grid.expand(batch, -1, -1, -1), grid_xy, mode="bilinear", align_corners=True)
        pos = pos.flatten(2).transpose(1, 2)
    keeps = torch.rand(batch, 1, 1) > pos_dropout
    return torch.where(keeps, pos, 0)


def radio_reference(state, args, pixels, slot, head_prefix, training=False):
    """RADIO's forward of one adaptor from its checkpoint tensors (pixels already conditioned); eval unless
    ``training`` (CPE augmentation, drawing from torch's global RNG)."""
    from timm.models.vision_transformer import VisionTransformer

    s = {k: v.float() for k, v in state.items() if v.is_floating_point()}
    with torch.random.fork_rng():  # the random draws of training mode must stay the model's
        vit = VisionTransformer(**RADIO_TINY_VIT, num_classes=0).eval()
    blocks = {
        k[len("base_model.") :].replace(".grandma", ".gamma"): v
        for k, v in s.items()
        if k.startswith("base_model.blocks")
    }
    vit.blocks.load_state_dict({k[len("blocks.") :]: v for k, v in blocks.items()})
    batch, _, height, width = pixels.shape
    rows, cols = height // 16, width // 16
    patches = F.unfold(pixels, kernel_size=16, stride=16).transpose(1, 2)  # (c, y, x) within a patch
    tokens = patches @ s["base_model.patch_generator.embedder.weight"].T
    pos = s["base_model.patch_generator.pos_embed"]
    grid = int(pos.shape[1] ** 0.5)
    pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    if training:
        tokens = tokens + radio_training_positions(pos, batch, rows, cols)
    else:
        if (rows, cols) != (grid, grid):
            side = max(rows, cols)
            pos = F.interpolate(pos, size=(side, side), mode="bilinear", align_corners=False)[..., :rows, :cols]
        tokens = tokens + pos.flatten(2).transpose(1, 2)
    cls = s["base_model.patch_generator.cls_token.token"].expand(batch, -1, -1)
    x = vit.blocks(torch.cat([cls, tokens], dim=1))[:, slot].float()
    h = head_prefix
    x = F.linear(x, s[h + "fc1.weight"], s[h + "fc1.bias"])
    if h + "final.2.weight" in s:  # MLP2: residual (LN, GELU, Linear) blocks, then (LN, GELU, Linear)
        i = 0
        while f"{h}blocks.{i}.0.weight" in s:
            y = F.layer_norm(x, x.shape[-1:], s[f"{h}blocks.{i}.0.weight"], s[f"{h}blocks.{i}.0.bias"])
            x = x + F.linear(F.gelu(y), s[f"{h}blocks.{i}.2.weight"], s[f"{h}blocks.{i}.2.bias"])
            i += 1
        y = F.layer_norm(x, x.shape[-1:], s[h + "final.0.weight"], s[h + "final.0.bias"])
        return F.linear(F.gelu(y), s[h + "final.2.weight"], s[h + "final.2.bias"])
    # MLP (v1): LN, ReLU, then (Linear, LN, ReLU) x n, then fc2
    x = F.relu(F.layer_norm(x, x.shape[-1:], s[h + "norm.weight"], s[h + "norm.bias"]))
    i = 0
    while f"{h}inner.{i}.weight" in s:
        x = F.linear(x, s[f"{h}inner.{i}.weight"], s[f"{h}inner.{i}.bias"])
        x = F.relu(F.layer_norm(x, x.shape[-1:], s[f"{h}inner.{i + 1}.weight"], s[f"{h}inner.{i + 1}.bias"]))
        i += 3
    return F.linear(x, s[h + "fc2.weight"], s[h + "fc2.bias"])


def _assert_equals_radio(model, state, args, slot, head_prefix, sizes=SIZES):
    torch.manual_seed(0)
    for height, width in sizes:
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            ours = model.image_features(pixels)
            expected = radio_reference(state, args, pixels, slot, head_prefix)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5, msg=f"at {height}x{width}")


@pytest.mark.parametrize(
    ("weights", "adaptor", "index"),
    [
        ("c-radio.pth.tar", "siglip", SIGLIP_INDEX),
        ("c-radio.pth.tar", "dfn_clip", CLIP_INDEX),
        ("hf", "siglip2-g", SIGLIP_INDEX),
        ("hf", "clip", CLIP_INDEX),
    ],
)
def test_image_embeddings_equal_radio(assets, weights, adaptor, index):
    model = _build(assets, adaptor, weights).eval()
    _assert_equals_radio(model, assets["state"], radio_args(), index, f"_heads.{index}.")
    # The input conditioner's mean/std become the model's pre-processing (data normalises, not the model).
    assert model.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073), abs=1e-6)


def test_mlp_v1_heads_token_slot_and_single_class_token(assets, tmp_path):
    # A teacher's token_slot wins over its index (RADIO: tconf.get('token_slot', index)).
    teachers = [dict(t) for t in RADIO_TEACHERS]
    teachers[SIGLIP_INDEX]["token_slot"] = 3
    args = radio_args(teachers=teachers, model="vit_tiny_patch16_224")  # timm's own ViT: LayerScale 'gamma'
    state = make_radio_checkpoint(tmp_path / "v1.pth.tar", {SIGLIP_INDEX: 32}, version="v1", args=args, seed=5)
    model = create_model(
        "c-radio_v3-b",
        pretrained_path=str(tmp_path / "v1.pth.tar"),
        adaptor_name="siglip",
        text_pretrained_path=_text_source(assets, "siglip"),
    ).eval()
    _assert_equals_radio(model, state, args, 3, f"_heads.{SIGLIP_INDEX}.", sizes=[(64, 96)])
    # Without a class token per teacher every adaptor reads token 0 (RADIO's slot 0).
    args = radio_args(teachers=teachers)
    args.cls_token_per_teacher = False
    args.register_multiple = None
    state = make_radio_checkpoint(tmp_path / "one.pth.tar", {SIGLIP_INDEX: 32}, args=args, seed=6)
    assert state["base_model.patch_generator.cls_token.token"].shape[0] == 1
    model = create_model(
        "c-radio_v3-b",
        pretrained_path=str(tmp_path / "one.pth.tar"),
        adaptor_name="siglip2-g",
        text_pretrained_path=_text_source(assets, "siglip"),
    ).eval()
    _assert_equals_radio(model, state, args, 0, f"_heads.{SIGLIP_INDEX}.", sizes=[(64, 64)])


V4_TEACHERS = [
    {"name": "siglip2-g", "type": "siglip2", "model": "siglip2-g-384"},
    {"name": "dino_v3", "type": "dino_v3"},
    {"name": "sam3", "type": "sam3"},
]


@pytest.mark.parametrize("weights", ["v4.pth.tar", "v4-hf"])
def test_c_radio_v4_checkpoints(assets, tmp_path, weights):
    """C-RADIOv4's teachers (SigLIP2-g, DINOv3, SAM3; 3 class tokens + 7 registers): null/siglip take the
    SigLIP2-g head; there is no clip teacher to take."""
    args = radio_args(teachers=V4_TEACHERS, cpe_num_registers=7)
    state = make_radio_checkpoint(tmp_path / "v4.pth.tar", {0: 32}, args=args, seed=9)
    make_radio_hf_folder(tmp_path / "v4-hf", state, ["siglip2-g"], args=args)
    assert state["base_model.patch_generator.cls_token.token"].shape[0] == 10
    for name in (None, "siglip"):
        model = create_model(
            "c-radio_v4-so400m",
            pretrained_path=str(tmp_path / weights),
            adaptor_name=name,
            text_pretrained_path=_text_source(assets, "siglip"),
        ).eval()
        _assert_equals_radio(model, state, args, 0, "_heads.0.", sizes=[(64, 96)])
    with pytest.raises(
        ModelError,
        match=r"'dfn' \(TAO's alias of 'clip'\) is not a teacher .*its teachers: siglip2-g \(siglip2\), dino_v3",
    ):
        create_model("c-radio_v4-h", pretrained_path=str(tmp_path / weights), adaptor_name="dfn")


def test_every_tensor_is_used_or_named(assets, tmp_path, caplog):
    state = dict(assets["state"])
    state["some_new_buffer"] = torch.zeros(2)
    state["base_model.reg_token"] = torch.zeros(1, 4, 192)  # RADIO's vit_*_v2 keep timm's unused registers
    torch.save({"args": radio_args(), "state_dict": state}, tmp_path / "extra.pth.tar")
    with caplog.at_level(logging.INFO, logger="clip_tao.models"):
        create_model(
            "c-radio_v3-b",
            pretrained_path=str(tmp_path / "extra.pth.tar"),
            adaptor_name="clip",
            text_pretrained_path=_text_source(assets, "clip"),
        )
    text = caplog.text
    for reason in (
        "spatial feature heads",
        "dense feature normaliser",
        "summary heads of the other teachers",
        "parts of timm's ViT RADIO does not run (e.g. base_model.reg_token)",
    ):
        assert reason in text
    assert "not part of RADIO's model" in text and "some_new_buffer" in text
    # A missing backbone or head tensor is an error that names it (in RADIO's own names).
    for missing in (
        "base_model.blocks.1.ls2.grandma",
        f"_heads.{CLIP_INDEX}.final.0.bias",
        "input_conditioner.norm_std",
    ):
        broken = {k: v for k, v in assets["state"].items() if k != missing}
        torch.save({"args": radio_args(), "state_dict": broken}, tmp_path / "missing.pth.tar")
        short = missing.removeprefix("base_model.").removeprefix(f"_heads.{CLIP_INDEX}.")
        with pytest.raises(ModelError, match=short.replace(".", r"\.")):
            create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "missing.pth.tar"), adaptor_name="clip")


def test_tao_adaptor_names_resolve_per_version(caplog):
    """TAO 7.0.1's table: null and siglip -> siglip2-g for c-radio_v3-h, siglip2 for -b/-l; clip aliases."""
    expected = {
        ("c-radio_v3-h", None): "siglip2-g",
        ("c-radio_v3-h", "siglip"): "siglip2-g",
        ("c-radio_v3-b", None): "siglip2",
        ("c-radio_v3-l", "siglip"): "siglip2",
        ("c-radio_v3-b", "dfn"): "clip",
        ("c-radio_v3-l", "dfn_clip"): "clip",
        ("c-radio_v3-h", "clip"): "clip",
        ("c-radio_v3-b", "siglip2"): "siglip2",
        ("c-radio_v3-h", "siglip2-g"): "siglip2-g",
        ("c-radio_v4-h", None): "siglip2-g",
        ("c-radio_v4-so400m", "siglip"): "siglip2-g",
    }
    for (model_type, name), teacher in expected.items():
        cfg = get_model_info(model_type).config
        with caplog.at_level(logging.INFO, logger="clip_tao.models.radio_adaptors"):
            chosen = resolve_adaptor(name, cfg["args"]["teachers"], cfg["tao_adaptor"], True, model_type)
        assert chosen.name == teacher, (model_type, name)
        assert f"teacher {chosen.index} of {model_type}" in caplog.text
    with pytest.raises(ModelError, match=r"'dino'.*its teachers: clip \(open_clip\), siglip2-g \(siglip2\), dino_v2"):
        cfg = get_model_info("c-radio_v3-h").config
        resolve_adaptor("dino", cfg["args"]["teachers"], "siglip2-g", True, "c-radio_v3-h")


def test_adaptor_names_resolve_against_the_checkpoint(assets, tmp_path):
    # c-radio_v3-b's TAO default is 'siglip2', but this checkpoint's SigLIP2 teacher is named 'siglip2-g':
    # null and 'siglip' follow the file's teacher list.
    for name in (None, "siglip"):
        model = _build(assets, name).eval()
        _assert_equals_radio(model, assets["state"], radio_args(), SIGLIP_INDEX, "_heads.1.", sizes=[(64, 64)])
    with pytest.raises(ModelError, match=r"'siglip2' is not a teacher of RADIO checkpoint .*its teachers: clip"):
        _build(assets, "siglip2")
    with pytest.raises(ModelError, match=r"teacher 'sam' .* is a sam teacher without a text tower"):
        _build(assets, "sam")
    # A Hugging Face folder exported without the adaptor says what to do.
    make_radio_hf_folder(tmp_path / "hf-clip", assets["state"], ["clip"])
    with pytest.raises(ModelError, match=r"no summary head for teacher 'siglip2-g' .*heads held: clip\): add the"):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "hf-clip"), adaptor_name="siglip")


def test_training_mode_applies_radios_cpe_augmentation(assets):
    """In training the position embedding is RADIO's random window + dropout, image by image (same draws)."""
    model = _build(assets, "siglip").train()
    for height, width in [(64, 96), (128, 128)]:
        pixels = torch.randn(6, 3, height, width)
        torch.manual_seed(7)
        with torch.no_grad():
            ours = model.image_features(pixels)
        torch.manual_seed(7)
        expected = radio_reference(assets["state"], radio_args(), pixels, SIGLIP_INDEX, "_heads.1.", training=True)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    pixels = pixels[:, :, :64, :96]
    with torch.no_grad():
        trained = model.image_features(pixels)
        evaluated = model.eval().image_features(pixels)
    assert not torch.allclose(evaluated, trained, atol=1e-3)  # the augmentation is on in training only


def test_siglip_adaptor_text_tower_is_the_teachers(assets):
    from transformers import AutoTokenizer, SiglipModel

    model = _build(assets, "siglip").eval()
    teacher = SiglipModel.from_pretrained(str(assets["root"] / "siglip")).eval()
    ids = model.tokenizer(["A Dog, running!", "two cats"])
    # RADIO's SigLIP2 adaptor: canonicalised text, Gemma ids padded to 64.
    reference = AutoTokenizer.from_pretrained(str(assets["root"] / "siglip"))(
        ["a dog running", "two cats"], padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, reference)
    with torch.no_grad():
        torch.testing.assert_close(
            model.text_features(ids), teacher.text_model(input_ids=ids).pooler_output, atol=1e-5, rtol=1e-5
        )
    assert model.embed_dim == 32 and model.context_length == 64


def test_clip_adaptor_text_tower_is_the_teachers(assets):
    import open_clip
    from open_clip.model import CLIP

    model = _build(assets, "clip").eval()
    folder = assets["root"] / "dfn"
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    teacher = CLIP(**cfg, init_logit_bias=-10.0).eval()
    open_clip.load_checkpoint(teacher, str(folder / "open_clip_pytorch_model.bin"))
    ids = model.tokenizer(["a photo of a dog", "two cats"])
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog", "two cats"]))
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(ids), teacher.encode_text(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("adaptor", "loss_type"), [("siglip", "siglip"), ("clip", "clip")])
def test_training_step_each_loss_and_state_dict_round_trip(assets, tmp_path, adaptor, loss_type):
    model = _build(assets, adaptor, loss_type=loss_type, image_size=64)
    # RADIO checkpoints carry no logit scale/bias: TAO's defaults for the loss apply.
    assert model.logit_bias.item() == pytest.approx(-10.0 if loss_type == "siglip" else 0.0)
    model.train()
    model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    image, text = model(torch.rand(4, 3, 64, 64), model.tokenizer(["a", "b c", "dog", "cat"]))
    loss = ContrastiveLoss(loss_type)(image, text, model.logit_scale, model.logit_bias)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.visual.backbone.embeds.proj.weight.grad is not None
    assert model.visual.backbone.embeds.pos_embed.grad is not None
    optimizer.step()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = _build(assets, adaptor, image_size=64)
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_towers_partition_the_parameters(assets):
    model = _build(assets, "clip")
    vision = {id(p) for p in model.vision_parameters()}
    text = {id(p) for p in model.text_parameters()}
    logits = {id(p) for p in model.logit_parameters()}
    assert not vision & text and vision | text | logits == {id(p) for p in model.parameters()}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_files_are_one_clear_error(assets, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    # Anything beyond argparse.Namespace in the pickle is refused (no blanket unpickling).
    with open(tmp_path / "evil.pth.tar", "wb") as f:
        pickle.dump({"args": Evil(), "state_dict": {}}, f)
    (tmp_path / "text.pth.tar").write_text("not a checkpoint")
    torch.save({"model": {}}, tmp_path / "other.pth")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    (tmp_path / "folder" / "model.safetensors").write_bytes(b"\0" * 16)
    cases = {
        "evil.pth.tar": "cannot be read safely",
        "text.pth.tar": "cannot be read safely",
        "other.pth": "is neither a RADIO torch.hub checkpoint",
        "folder": "has no 'args': it is not a RADIO model's config.json",
        "none.pth.tar": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(ModelError, match=message):
            create_model("c-radio_v3-b", pretrained_path=str(tmp_path / name), adaptor_name="siglip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="is not a Hugging Face RADIO folder: it needs config.json"):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "empty"), adaptor_name="siglip")
    # A head whose tensors fit no MLP version.
    state = {k: v for k, v in assets["state"].items() if not k.startswith("_heads.1.final")}
    torch.save({"args": radio_args(), "state_dict": state}, tmp_path / "head.pth.tar")
    with pytest.raises(ModelError, match=r"head of teacher 'siglip2-g' fits no RADIO MLP version"):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "head.pth.tar"), adaptor_name="siglip")


def test_image_sizes_must_be_multiples_of_the_patch(assets):
    with pytest.raises(ModelError, match="model.image_size=100 does not fit c-radio_v3-b: use a multiple of its patch"):
        _build(assets, "siglip", image_size=100)
    model = _build(assets, "siglip")
    with pytest.raises(ModelError, match="multiples of 16; got 64x100"):
        model.image_features(torch.zeros(1, 3, 64, 100))


def test_args_that_disagree_with_the_weights_are_refused(assets, tmp_path):
    """LayerScale stored but not in args.model_kwargs must not be dropped silently."""
    args = radio_args()
    args.model_kwargs = {"embed_dim": 192, "num_heads": 3, "depth": 2}  # no init_values: no LayerScale
    torch.save({"args": args, "state_dict": assets["state"]}, tmp_path / "mismatch.pth.tar")
    with pytest.raises(
        ModelError, match=r"backbone tensors its args do not describe \(e\.g\. \['blocks\.0\.ls1\.grandma'"
    ):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "mismatch.pth.tar"), adaptor_name="clip")
    args.model_kwargs = {**RADIO_TINY_VIT, "no_such_option": 1}
    torch.save({"args": args, "state_dict": assets["state"]}, tmp_path / "unknown.pth.tar")
    with pytest.raises(ModelError, match="do not fit timm's"):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "unknown.pth.tar"), adaptor_name="clip")


def test_unreachable_published_weights_name_the_file(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match=r"`hf download nvidia/C-RADIOv4-H c-radio_v4-h_half\.pth\.tar"):
        create_model("c-radio_v4-h", adaptor_name="siglip")


def test_published_checkpoint_is_read_from_the_hf_cache_offline(assets, tmp_path, monkeypatch):
    """What `hf download nvidia/C-RADIOv3-B c-radio_v3-b_half.pth.tar` leaves, read offline."""
    import shutil

    import huggingface_hub.constants as hub_constants

    commit = "1" * 40
    repo = tmp_path / "cache" / "models--nvidia--C-RADIOv3-B"
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copyfile(assets["root"] / "c-radio.pth.tar", repo / "snapshots" / commit / "c-radio_v3-b_half.pth.tar")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    cached = create_model("c-radio_v3-b", adaptor_name="siglip", text_pretrained_path=_text_source(assets, "siglip"))
    _assert_equals_radio(cached.eval(), assets["state"], radio_args(), SIGLIP_INDEX, "_heads.1.", sizes=[(64, 64)])


# -- model.radio_repo_dir -----------------------------------------------------------------------------

# A minimal stand-in for a clone of NVlabs/RADIO with the same entry points: hubconf.radio_model(version,
# adaptor_names, return_checkpoint) and radio.adaptor_generic.GenericAdaptor(args, teacher, state). Its
# radio_model refuses adaptor_names, as the real one would need the network to build a teacher adaptor.
# Set CLIP_TAO_RADIO_REPO to a real clone to run the same test against RADIO's own code.
STAND_IN_HUBCONF = """
import torch
from torch import nn
from types import SimpleNamespace

import clip_tao.models.radio_backbone as rb
from clip_tao.models.radio_checkpoint import read_radio_checkpoint

dependencies = ["torch", "timm"]


class _Radio(nn.Module):
    patch_size = 16

    def __init__(self, backbone, mean, std):
        super().__init__()
        self.model = backbone
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1))
        self.adaptors = nn.ModuleDict()

    def forward(self, x):
        y = self.model.forward_features((x - self.mean) / self.std)
        out = {"backbone": SimpleNamespace(summary=y[:, 0], features=None)}
        for name, adaptor in self.adaptors.items():
            out[name] = SimpleNamespace(summary=adaptor.head_mlp(y[:, adaptor.head_idx].float()), features=None)
        return out


def radio_model(version="", progress=True, adaptor_names=None, return_checkpoint=False, **kwargs):
    if adaptor_names:
        raise RuntimeError("building a teacher adaptor downloads its teacher model")
    ckpt = read_radio_checkpoint(version)
    backbone = rb.create_backbone("naflexvit_base_patch16_radio_v3", rb.timm_arguments(ckpt.args, version))
    rb.load_backbone(backbone, ckpt.backbone, version)
    radio = _Radio(backbone, *ckpt.conditioner)
    chk = torch.load(version, weights_only=False)
    return (radio, chk) if return_checkpoint else radio
"""
STAND_IN_GENERIC = """
from torch import nn
from clip_tao.models.radio_heads import head_from_state


class GenericAdaptor(nn.Module):
    def __init__(self, main_config, adaptor_config, state):
        super().__init__()
        self.head_mlp = head_from_state({k[8:]: v for k, v in state.items() if k.startswith("summary.")}, "head")
        self.head_idx = 0
"""


def _radio_repo(tmp_path):
    real = os.environ.get("CLIP_TAO_RADIO_REPO")
    if real:
        return real
    repo = tmp_path / "RADIO"
    (repo / "radio").mkdir(parents=True)
    (repo / "hubconf.py").write_text(STAND_IN_HUBCONF, encoding="utf-8")
    (repo / "radio" / "__init__.py").write_text("", encoding="utf-8")
    (repo / "radio" / "adaptor_generic.py").write_text(STAND_IN_GENERIC, encoding="utf-8")
    return str(repo)


@pytest.mark.filterwarnings("ignore")
def test_local_radio_repo_works_offline(assets, tmp_path):
    """model.radio_repo_dir: RADIO's radio_model with no adaptors + the head built by its GenericAdaptor."""
    import sys

    repo = _radio_repo(tmp_path)
    try:
        hub = _build(assets, "siglip", radio_repo_dir=repo).eval()
    finally:
        for name in [m for m in sys.modules if m == "radio" or m.startswith("radio.")]:
            del sys.modules[name]  # the stand-in's package must not shadow a later real clone
    assert hub.preprocess.mean == (0.0, 0.0, 0.0) and hub.preprocess.std == (1.0, 1.0, 1.0)
    native = _build(assets, "siglip").eval()
    mean = torch.tensor(native.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(native.preprocess.std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    for height, width in SIZES:
        raw = torch.rand(2, 3, height, width)
        with torch.no_grad():
            expected = radio_reference(assets["state"], radio_args(), (raw - mean) / std, SIGLIP_INDEX, "_heads.1.")
            torch.testing.assert_close(hub.image_features(raw).float(), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(native.image_features((raw - mean) / std), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="holds no hubconf.py"):
        _build(assets, "siglip", radio_repo_dir=str(tmp_path / "nowhere"))


@pytest.mark.skipif(
    not os.environ.get("CLIP_TAO_RADIO_REPO"), reason="set CLIP_TAO_RADIO_REPO to a clone of NVlabs/RADIO"
)
@pytest.mark.filterwarnings("ignore")
def test_hugging_face_layout_equals_radios_own_hf_model(assets, tmp_path):
    """RADIO's own ``hf_model.RADIOModel`` on the same folder (needs a clone of NVlabs/RADIO and einops)."""
    import sys

    sys.path.insert(0, os.environ["CLIP_TAO_RADIO_REPO"])
    try:
        from radio.hf_model import RADIOConfig, RADIOModel
        from safetensors.torch import load_file
    finally:
        sys.path.pop(0)
    # RADIO's Hugging Face model counts summary tokens per teacher entry, so give it unique names.
    args = radio_args(teachers=RADIO_TEACHERS[:4])
    state = make_radio_checkpoint(tmp_path / "u.pth.tar", {CLIP_INDEX: 24, SIGLIP_INDEX: 32}, args=args)
    folder = make_radio_hf_folder(tmp_path / "hf", state, ["clip", "siglip2-g"], args=args)
    config = json.loads((folder / "config.json").read_text())
    radio = RADIOModel(RADIOConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    radio.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    radio.eval()
    for adaptor in ("siglip2-g", "clip"):
        ours = create_model(
            "c-radio_v3-b",
            pretrained_path=str(folder),
            adaptor_name=adaptor,
            text_pretrained_path=_text_source(assets, adaptor),
        ).eval()
        mean = torch.tensor(ours.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(ours.preprocess.std).view(1, 3, 1, 1)
        for height, width in [*SIZES, (256, 128)]:
            raw = torch.rand(2, 3, height, width)
            with torch.no_grad():
                expected = radio(raw)[adaptor].summary
                torch.testing.assert_close(ours.image_features((raw - mean) / std), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not os.environ.get("CLIP_TAO_RADIO_REPO"), reason="set CLIP_TAO_RADIO_REPO to a clone of NVlabs/RADIO"
)
@pytest.mark.filterwarnings("ignore")
def test_all_tokens_equal_radios_hubconf_in_eval_and_training(assets):
    """Every output token of RADIO's own ``hubconf.radio_model`` backbone, eval and training (same draws)."""
    import sys

    sys.path.insert(0, os.environ["CLIP_TAO_RADIO_REPO"])
    try:
        import hubconf
    finally:
        sys.path.pop(0)
    radio = hubconf.radio_model(str(assets["root"] / "c-radio.pth.tar"))
    ours = _build(assets, "siglip")
    backbone = ours.visual.backbone
    mean = torch.tensor(ours.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(ours.preprocess.std).view(1, 3, 1, 1)
    for training in (False, True):
        radio.train(training)
        backbone.train(training)
        for height, width in [*SIZES, (256, 64)]:
            raw = torch.rand(8, 3, height, width)
            with torch.no_grad():
                torch.manual_seed(3)
                expected = radio.model.forward_features(radio.input_conditioner(raw))
                torch.manual_seed(3)
                got = backbone.forward_features((raw - mean) / std)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_lora_targets_are_taos_radio_names(assets):
    """TAO 7.3's Radio-CLIP targets: the image tower's fused attention Linears ``qkv`` and ``proj`` of every block
    (timm's ``blocks.<i>.attn``), nothing of the MLPs; the SigLIP adaptor's text tower takes SigLIP2's names."""
    from clip_tao.config.schema import LoraTargetConfig
    from clip_tao.engine.lora import lora_targets

    model = _build(assets, "siglip")
    vision = lora_targets(model, "vision", LoraTargetConfig(target_modules=["qkv", "proj"], num_last_blocks=0))
    blocks = sorted({name.split(".attn.")[0] for name in vision})
    assert vision and all(name.endswith((".attn.qkv", ".attn.proj")) for name in vision)
    assert len(vision) == 2 * len(blocks) and all(".blocks." in b for b in blocks)
    text = lora_targets(model, "text", LoraTargetConfig(num_last_blocks=1))
    assert sorted(name.rsplit(".", 1)[1] for name in text) == ["k_proj", "out_proj", "q_proj", "v_proj"]

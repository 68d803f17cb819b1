"""Radio-CLIP offline fidelity: a tiny RADIO ``{args, state_dict}`` checkpoint loads through ``model.type``.

The reference forward below is written independently of clip_tao's modules, straight from the
checkpoint's tensors: unfold patches, bias-free projection, RADIO's eval-time position-embedding resize
(bilinear, align_corners=True, resize to a square then crop), class tokens + registers, timm's blocks,
then the MLP v2 head on the adaptor teacher's class token.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from clip_tao.errors import ModelError
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model
from tests.family_assets import (
    TINY_NVCLIP,
    make_gemma_tokenizer,
    make_openclip_folder,
    make_radio_checkpoint,
    make_siglip_folder,
    radio_args,
)

SIGLIP_INDEX, CLIP_INDEX = 1, 0  # positions of the teachers in family_assets.RADIO_TEACHERS


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("radio")
    spm_model = make_gemma_tokenizer(root / "gemma")
    make_siglip_folder(root / "siglip", root / "gemma")
    clip_cfg = {
        **TINY_NVCLIP,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    clip_cfg["embed_dim"] = 24
    make_openclip_folder(root / "dfn", clip_cfg, None)
    # The clip teacher's head maps to the DFN text width 24; the siglip head to the tiny SigLIP width 32.
    state = make_radio_checkpoint(root / "c-radio.pth.tar", {CLIP_INDEX: 24, SIGLIP_INDEX: 32})
    return {"root": root, "state": state, "spm": spm_model}


def _build(assets, adaptor: str, **kw):
    text = assets["root"] / ("siglip" if adaptor == "siglip" else "dfn")
    return create_model(
        "c-radio_v3-b",
        pretrained_path=str(assets["root"] / "c-radio.pth.tar"),
        adaptor_name=adaptor,
        text_pretrained_path=str(text),
        **kw,
    )


def reference_image_embedding(state, pixels, head_index):
    """RADIO's eval forward from the raw checkpoint tensors (pixels already conditioned)."""
    import timm

    s = {k: v.float() for k, v in state.items() if v.is_floating_point()}
    args = radio_args()
    vit = timm.create_model(args.model, pretrained=False, num_classes=0, **args.model_kwargs).eval()
    blocks = {
        k[len("base_model.") :].replace(".grandma", ".gamma"): v
        for k, v in s.items()
        if k.startswith("base_model.blocks") or k.startswith("base_model.norm")
    }
    vit.load_state_dict(blocks, strict=False)
    batch, _, height, width = pixels.shape
    patch = 16
    rows, cols = height // patch, width // patch
    patches = F.unfold(pixels, kernel_size=patch, stride=patch).transpose(1, 2)  # (c, y, x) inside a patch
    tokens = patches @ s["base_model.patch_generator.embedder.weight"].T
    pos = s["base_model.patch_generator.pos_embed"]
    grid = int(math.isqrt(pos.shape[1]))
    pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    side = max(rows, cols)
    pos = F.interpolate(pos, size=(side, side), mode="bilinear", align_corners=True)[..., :rows, :cols]
    tokens = tokens + pos.flatten(2).transpose(1, 2)
    cls = s["base_model.patch_generator.cls_token.token"].expand(batch, -1, -1)
    tokens = vit.norm(vit.blocks(torch.cat([cls, tokens], dim=1)))
    x = tokens[:, head_index]
    h = f"_heads.{head_index}."
    x = F.linear(x, s[h + "fc1.weight"], s[h + "fc1.bias"])
    y = F.layer_norm(x, x.shape[-1:], s[h + "blocks.0.0.weight"], s[h + "blocks.0.0.bias"])
    x = x + F.linear(F.gelu(y), s[h + "blocks.0.2.weight"], s[h + "blocks.0.2.bias"])
    y = F.layer_norm(x, x.shape[-1:], s[h + "final.0.weight"], s[h + "final.0.bias"])
    return F.linear(F.gelu(y), s[h + "final.2.weight"], s[h + "final.2.bias"])


@pytest.mark.parametrize(
    ("adaptor", "head_index"), [("siglip", SIGLIP_INDEX), ("clip", CLIP_INDEX), ("dfn_clip", CLIP_INDEX)]
)
def test_image_embeddings_equal_radio_forward(assets, adaptor, head_index):
    model = _build(assets, adaptor).eval()
    torch.manual_seed(0)
    # A non-square size below the 8x8 CPE grid exercises the resize-then-crop of the position embedding.
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = model.image_features(pixels)
        expected = reference_image_embedding(assets["state"], pixels, head_index)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # The input conditioner's mean/std become the model's pre-processing (data normalises, not the model).
    assert model.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073), abs=1e-6)


def test_siglip_adaptor_text_tower_is_the_teachers(assets):
    from transformers import AutoTokenizer, SiglipModel

    model = _build(assets, "siglip").eval()
    teacher = SiglipModel.from_pretrained(str(assets["root"] / "siglip")).eval()
    texts = ["A Dog, running!", "two cats"]
    ids = model.tokenizer(texts)
    assert ids.shape == (2, 64)
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


def test_training_step_each_loss_and_state_dict_round_trip(assets, tmp_path):
    for loss_type in ("siglip", "clip"):
        model = _build(assets, "siglip", loss_type=loss_type, image_size=64)
        # RADIO checkpoints carry no logit scale/bias: TAO's defaults for the loss apply.
        assert model.logit_bias.item() == pytest.approx(-10.0 if loss_type == "siglip" else 0.0)
        model.train()
        model.set_grad_checkpointing(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        image, text = model(torch.randn(4, 3, 64, 64), model.tokenizer(["a", "b c", "dog", "cat"]))
        loss = ContrastiveLoss(loss_type)(image, text, model.logit_scale, model.logit_bias)
        loss.backward()
        assert torch.isfinite(loss)
        assert model.visual.backbone.patch_generator.embedder.weight.grad is not None
        optimizer.step()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    again = _build(assets, "siglip", image_size=64)
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_towers_partition_the_parameters(assets):
    model = _build(assets, "clip")
    vision = {id(p) for p in model.vision_parameters()}
    text = {id(p) for p in model.text_parameters()}
    logits = {id(p) for p in model.logit_parameters()}
    assert not vision & text and vision | text | logits == {id(p) for p in model.parameters()}


def test_adaptor_is_required_and_checked(assets):
    with pytest.raises(ModelError, match="model.adaptor_name is required for c-radio_v3-b"):
        create_model("c-radio_v3-b", pretrained=False)
    with pytest.raises(ModelError, match="adaptor_name='dino'"):
        create_model("c-radio_v3-b", pretrained=False, adaptor_name="dino")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_is_read_with_an_allow_list_only(assets, tmp_path):
    # Anything beyond argparse.Namespace in the pickle is refused (no blanket unpickling).
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth.tar"
    with open(path, "wb") as f:
        pickle.dump({"args": Evil(), "state_dict": {}}, f)
    with pytest.raises(ModelError, match="cannot be read safely"):
        create_model("c-radio_v3-b", pretrained_path=str(path), adaptor_name="siglip")
    with pytest.raises(ModelError, match="does not exist"):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "none.pth.tar"), adaptor_name="siglip")


def test_unreachable_published_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match=r"`hf download nvidia/C-RADIOv3-B c-radio_v3-b_half\.pth\.tar`"):
        create_model("c-radio_v3-b", adaptor_name="siglip")


HUBCONF = '''
"""A local stand-in for a clone of NVlabs/RADIO: same entry point and output layout (dict of summaries)."""
from types import SimpleNamespace

import torch
from torch import nn

from clip_tao.models.radio_backbone import MlpHeadV2, RadioBackbone, head_state, load_backbone_weights, read_radio_checkpoint

dependencies = ["torch", "timm"]


class _Adaptor(nn.Module):
    def __init__(self, head, index):
        super().__init__()
        self.head_mlp = head
        self.head_idx = index
        self.text_model = nn.Linear(2, 2)  # RADIO's adaptors carry the teacher's text model


class _Radio(nn.Module):
    patch_size = 16

    def __init__(self, backbone, mean, std, adaptors):
        super().__init__()
        self.model = backbone
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.adaptors = nn.ModuleDict(adaptors)

    def forward(self, x):
        y = self.model((x - self.mean) / self.std)  # RADIO conditions its own input
        out = {"backbone": SimpleNamespace(summary=y[:, 0], features=y[:, 8:])}
        for name, adaptor in self.adaptors.items():
            out[name] = SimpleNamespace(summary=adaptor.head_mlp(y[:, adaptor.head_idx]), features=None)
        return out


def radio_model(version="", progress=True, adaptor_names=None, **kwargs):
    args, state = read_radio_checkpoint(version)
    backbone = RadioBackbone(args, init_weights=False)
    load_backbone_weights(backbone, state, version)
    adaptors = {}
    for index, teacher in enumerate(args.teachers):
        if teacher["name"] in (adaptor_names or []):
            weights = head_state(state, index, teacher["name"])
            head = MlpHeadV2(**MlpHeadV2.shape_from_state(weights))
            head.load_state_dict(weights)
            adaptors[teacher["name"]] = _Adaptor(head, index)
    return _Radio(backbone, state["input_conditioner.norm_mean"], state["input_conditioner.norm_std"], adaptors)
'''


def test_local_radio_repo_through_torch_hub(assets, tmp_path):
    """model.radio_repo_dir: the image tower comes from torch.hub.load(dir, source='local'), fed [0, 1] pixels."""
    repo = tmp_path / "RADIO"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF, encoding="utf-8")
    hub = _build(assets, "siglip", radio_repo_dir=str(repo)).eval()
    native = _build(assets, "siglip").eval()
    assert hub.preprocess.mean == (0.0, 0.0, 0.0) and hub.preprocess.std == (1.0, 1.0, 1.0)
    assert hub.visual.radio.adaptors["siglip2-g"].text_model is None  # our text tower replaces the adaptor's
    raw = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(native.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(native.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(hub.encode_image(raw), native.encode_image((raw - mean) / std), atol=1e-5, rtol=1e-5)
        ids = hub.tokenizer(["a dog"])
        torch.testing.assert_close(hub.encode_text(ids), native.encode_text(ids))
    with pytest.raises(ModelError, match="holds no hubconf.py"):
        _build(assets, "siglip", radio_repo_dir=str(tmp_path))


def test_missing_head_or_wrong_text_source_is_one_clear_error(assets, tmp_path):
    make_radio_checkpoint(tmp_path / "clip-only.pth.tar", {CLIP_INDEX: 24})
    with pytest.raises(ModelError, match=r"has no adaptor head for its siglip2-g teacher \(_heads\.1\.\*\)"):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "clip-only.pth.tar"), adaptor_name="siglip")
    with pytest.raises(ModelError, match="siglip adaptor needs the teacher's save_pretrained folder"):
        create_model(
            "c-radio_v3-b",
            pretrained_path=str(assets["root"] / "c-radio.pth.tar"),
            adaptor_name="siglip",
            text_pretrained_path=str(assets["root"] / "c-radio.pth.tar"),
        )


def test_backbone_weights_the_args_do_not_describe_are_refused(assets, tmp_path):
    """LayerScale stored but not in args.model_kwargs must not be dropped silently."""
    args = radio_args()
    args.model_kwargs = {"depth": 2}  # no init_values: the architecture has no LayerScale
    torch.save({"args": args, "state_dict": assets["state"]}, tmp_path / "mismatch.pth.tar")
    with pytest.raises(
        ModelError, match=r"backbone weights its args do not describe \(e\.g\. \['blocks\.0\.ls1\.gamma'"
    ):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "mismatch.pth.tar"), adaptor_name="clip")
    args.model_kwargs = {"depth": 2, "no_such_option": 1}
    torch.save({"args": args, "state_dict": assets["state"]}, tmp_path / "unknown.pth.tar")
    with pytest.raises(ModelError, match="cannot be built on timm"):
        create_model("c-radio_v3-b", pretrained_path=str(tmp_path / "unknown.pth.tar"), adaptor_name="clip")


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
    cached = create_model("c-radio_v3-b", adaptor_name="siglip", text_pretrained_path=str(assets["root"] / "siglip"))
    local = _build(assets, "siglip")
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(cached.eval().encode_image(pixels), local.eval().encode_image(pixels))

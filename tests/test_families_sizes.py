"""The real-size architectures, instantiated once each on the meta device (no memory, no download).

Published sizes: SigLIP2 So400m ~400 M vision parameters; C-RADIOv3-B/L/H/g widths 768/1024/1280/1536
(about 98 M / 320 M / 653 M / 1.1 B backbone parameters), C-RADIOv4-SO400M/H from timm's definitions; NV-CLIP L/H vision towers ~304 M / ~632 M.
"""

from __future__ import annotations

import copy

import pytest
import torch

from clip_tao.models import list_models
from clip_tao.models.registry import get_model_info


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("info", list_models("siglip2-so400m-*"), ids=lambda i: i.name)
def test_siglip2_so400m_sizes(info):
    from clip_tao.models.siglip_family import build_siglip_module

    with torch.device("meta"):
        model = build_siglip_module(info)
    assert 400 <= _count(model.vision_model) <= 432
    assert model.config.vision_config.hidden_size == info.embed_dim == 1152
    assert model.config.text_config.max_position_embeddings == info.context_length == 64


def test_siglip2_naflex_size():
    from clip_tao.models.naflex_family import build_naflex_module

    with torch.device("meta"):
        model = build_naflex_module(get_model_info("siglip2-so400m-patch16-naflex"))
    assert 400 <= _count(model.vision_model) <= 432


@pytest.mark.parametrize(
    ("name", "width", "depth", "prefix", "millions"),
    [
        ("c-radio_v3-b", 768, 12, 8, 98),
        ("c-radio_v3-l", 1024, 24, 8, 320),
        ("c-radio_v3-h", 1280, 32, 8, 652),
        ("c-radio_v3-g", 1536, 40, 8, 1160),
        # C-RADIOv4 as timm defines it (SO400M: SigLIP's 27 x 1152 ViT; H as v3-H with 10 prefix tokens).
        ("c-radio_v4-so400m", 1152, 27, 10, 431),
        ("c-radio_v4-h", 1280, 32, 10, 652),
    ],
)
def test_c_radio_backbone_sizes(name, width, depth, prefix, millions):
    from clip_tao.models.radio_backbone import create_backbone, num_prefix_tokens

    info = get_model_info(name)
    with torch.device("meta"):
        backbone = create_backbone(info.config["timm_model"])
    assert backbone.embed_dim == width and len(backbone.blocks) == depth
    assert _count(backbone) == pytest.approx(millions, rel=0.01)
    # Class tokens + registers, the 2048-px CPE grid (128 x 128), no final norm; the type's recorded
    # RADIO args describe the same token count.
    assert backbone.num_prefix_tokens == prefix == num_prefix_tokens(info.config["args"])
    assert tuple(backbone.embeds.pos_embed.shape[1:3]) == (128, 128)
    assert isinstance(backbone.norm, torch.nn.Identity)


@pytest.mark.parametrize(
    ("name", "vision_millions"), [("ViT-L-14-SigLIP-CLIPA-224", 304), ("ViT-H-14-SigLIP-CLIPA-224", 632)]
)
def test_nvclip_sizes(name, vision_millions):
    from clip_tao.models.openclip_family import build_openclip_module

    with torch.device("meta"):
        clip = build_openclip_module(copy.deepcopy(get_model_info(name).config))
    assert _count(clip.visual) == pytest.approx(vision_millions, rel=0.01)
    assert clip.text_projection.shape[1] == get_model_info(name).embed_dim


def test_every_family_type_is_registered():
    names = {i.name for i in list_models()}
    assert {f"siglip2-so400m-patch{p}" for p in ("14-224", "14-384", "16-256", "16-384", "16-512")} <= names
    assert {f"c-radio_v3-{s}" for s in "blhg"} | {"siglip2-so400m-patch16-naflex"} <= names
    assert {"c-radio_v4-so400m", "c-radio_v4-h"} <= names
    assert {
        f"ViT-{v}-14-SigLIP-CLIPA-{r}" for v, r in [("L", 224), ("L", 336), ("H", 224), ("H", 336), ("H", 574)]
    } <= names

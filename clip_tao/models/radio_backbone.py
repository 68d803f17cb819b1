"""The C-RADIO image backbone: timm's NaFlexVit RADIO port, sized by a RADIO checkpoint's training args.

timm (>= 1.0.31) ships NVIDIA's C-RADIO backbones (``naflexvit_{base,large,huge,giant}_patch16_radio_v3``,
``naflexvit_{so400m,huge}_patch16_radio_v4``): a bias-free linear patch embedding, the 128 x 128 position
grid resized bilinearly to a square of the larger patch-grid side and cropped top-left, one class token
per teacher (the first is ``cls_token``, the rest and the registers are ``reg_token``), no final norm.
Its ``checkpoint_filter_fn`` (with ``_convert_radio``) maps RADIO's weights to timm's names. This module
derives timm's arguments from RADIO's ``args`` (what ``create_model_from_args`` + ``enable_cpe`` build),
loads a checkpoint strictly, and adds the one thing timm's port leaves out: RADIO's random position-window
augmentation and position dropout in training mode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.naflexvit import NaFlexEmbeds
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.radio_checkpoint import arg

log = logging.getLogger(__name__)

# ViT names that RADIO registers in timm itself (radio/extra_timm_models.py) and timm does not ship.
RADIO_EXTRA_VITS = {
    "vit_tiny_patch14_224": dict(patch_size=14, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch14_224": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_224": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_v2_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=1e-5),
    "vit_large_patch16_v2_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
    "vit_so400m_patch16_224": dict(patch_size=16, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152),
    "vit_huge_patch16_224": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16),
    "vit_giant_patch16_224": dict(patch_size=16, embed_dim=1536, depth=40, num_heads=24),
    "vit_bigG_patch14_224": dict(patch_size=14, embed_dim=1664, depth=48, num_heads=16, init_values=1e-6),
}

# RADIO's current ViTPatchGenerator resizes the position grid with align_corners=False (what TAO runs
# through torch.hub); timm follows each Hugging Face repo's older code (True for v3-B/H).
POS_EMBED_ALIGN_CORNERS = False


def num_prefix_tokens(args: Mapping[str, Any]) -> int:
    """Class tokens (one per unique teacher name, or one) + registers, as RADIO's ``enable_cpe`` counts them."""
    per_teacher = arg(args, "cls_token_per_teacher", True)
    num_cls = len({t["name"] for t in arg(args, "teachers", [])}) if per_teacher else 1
    num_registers = arg(args, "cpe_num_registers", 0)
    multiple = arg(args, "register_multiple", 0)
    if not num_registers and multiple:
        num_registers = multiple - (num_cls % multiple)
    return max(num_cls, 1) + num_registers


def timm_arguments(args: Mapping[str, Any], where: str) -> dict[str, Any]:
    """timm NaFlexVit arguments for the backbone that ``args`` (RADIO's training args) describe."""
    import timm
    from timm.layers import LayerScale
    from timm.models.vision_transformer import VisionTransformer

    name = args.get("model")
    kwargs = dict(args.get("model_kwargs") or {})
    kwargs.pop("weight_init", None)
    kwargs.pop("final_norm", None)  # RADIO decides the final norm from args.model_norm
    if arg(args, "cpe_max_size") is None:
        raise ModelError(f"{where} has no CPE (args.cpe_max_size is None): only C-RADIO checkpoints are supported")
    try:
        with torch.device("meta"):  # read the architecture off the timm model, allocate nothing
            if name in RADIO_EXTRA_VITS:
                vit = VisionTransformer(**{**RADIO_EXTRA_VITS[name], **kwargs, "num_classes": 0})
            elif isinstance(name, str) and timm.is_model(name):
                vit = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
            else:
                raise ModelError(f"{where} names backbone args.model={name!r}, which neither timm nor RADIO defines")
    except TypeError as exc:
        raise ModelError(
            f"{where}: args.model_kwargs {kwargs} do not fit timm's {name!r} ({exc}); load it with "
            "model.radio_repo_dir (RADIO's own code)"
        ) from exc
    block = vit.blocks[0]
    unsupported = [
        feature
        for feature, present in (
            ("patch normalisation", not isinstance(vit.patch_embed.norm, nn.Identity)),
            ("MLP norm", not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity)),
            ("attention inner norm", not isinstance(getattr(block.attn, "norm", nn.Identity()), nn.Identity)),
        )
        if present
    ]
    if unsupported:
        raise ModelError(
            f"{where}: backbone {name!r} uses {', '.join(unsupported)}, which timm's RADIO port does not have; "
            "load it with model.radio_repo_dir (RADIO's own code)"
        )
    patch = vit.patch_embed.patch_size[0]
    max_size = int(round(arg(args, "cpe_max_size") / patch) * patch)
    grid = math.ceil(max_size / patch)
    return {
        "patch_size": patch,
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
        "init_values": 1e-5 if isinstance(block.ls1, LayerScale) else None,
        "final_norm": bool(arg(args, "model_norm", False)),
        "reg_tokens": num_prefix_tokens(args) - 1,
        "pos_embed_grid_size": (grid, grid),
        "pos_embed_align_corners": POS_EMBED_ALIGN_CORNERS,
    }


# RADIO's enable_cpe default: in training each image's position embedding is dropped with this probability.
CPE_POS_DROPOUT = 0.1


class CpeTrainingEmbeds(NaFlexEmbeds):
    """timm's NaFlex embedding with RADIO's training-time CPE augmentation (``ViTPatchGenerator`` in train mode).

    In training RADIO samples, per image, a window of the position grid (scale in [sqrt(0.1), 1], aspect in
    [3/4, 4/3], random offset; ``grid_sample``, ``align_corners=True``) instead of the eval resize, then drops
    the whole position embedding of an image with probability 0.1. Evaluation is timm's code unchanged.
    """

    pos_dropout = CPE_POS_DROPOUT

    def _apply_learned_pos_embed(self, x: torch.Tensor, grid_size) -> None:
        if not self.training:
            return super()._apply_learned_pos_embed(x, grid_size)
        batch = x.shape[0]
        rows, cols = int(grid_size[0]), int(grid_size[1])
        grid = self.pos_embed.permute(0, 3, 1, 2)  # [1, C, H, W]
        if (rows, cols) == tuple(grid.shape[-2:]):
            pos = grid.expand(batch, -1, -1, -1)  # the full grid: RADIO takes it as is
        else:
            pos = _random_window(grid, batch, rows, cols)
        pos = pos.flatten(2).transpose(1, 2)
        if self.pos_dropout > 0:
            keep = torch.rand(batch, 1, 1, dtype=pos.dtype, device=pos.device) > self.pos_dropout
            pos = torch.where(keep, pos, torch.zeros((), dtype=pos.dtype, device=pos.device))
        x.add_(pos.to(x.dtype))


def _random_window(grid: torch.Tensor, batch: int, rows: int, cols: int) -> torch.Tensor:
    """``[B, C, rows, cols]``: RADIO's random crop-and-resize of the position grid (random draws in its order)."""
    device = grid.device
    min_scale = math.sqrt(0.1)
    scale = torch.rand(batch, 1, 1, device=device) * (1 - min_scale) + min_scale
    log_aspect = math.log(3 / 4)
    aspect = torch.exp(torch.rand(batch, 1, 1, device=device) * (-2 * log_aspect) + log_aspect)
    scale_xy = torch.stack([scale * aspect, scale / aspect], dim=-1).clamp_(0, 1)
    offset = torch.rand(batch, 1, 1, 2, device=device) * (1 - scale_xy)
    lin_x = torch.linspace(0, 1, steps=cols, device=device)[None, None].expand(batch, rows, -1)
    lin_y = torch.linspace(0, 1, steps=rows, device=device)[None, :, None].expand(batch, -1, cols)
    sample_at = (torch.stack([lin_x, lin_y], dim=-1) * scale_xy + offset) * 2 - 1
    window = F.grid_sample(
        grid.float().expand(batch, -1, -1, -1), sample_at, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return window.to(grid.dtype)


def create_backbone(timm_name: str, overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """timm's RADIO backbone ``timm_name`` (``overrides`` from :func:`timm_arguments`) with a bias-free patch
    embedding, as RADIO's ``ViTPatchLinear``, and RADIO's training-time CPE augmentation."""
    from timm.models import model_entrypoint

    kwargs = {"pos_embed_align_corners": POS_EMBED_ALIGN_CORNERS, **(overrides or {})}
    # The registered entry point itself: timm.create_model would drop None overrides (init_values=None).
    model = model_entrypoint(timm_name)(pretrained=False, num_classes=0, **kwargs)
    proj = model.embeds.proj
    bias_free = nn.Linear(proj.in_features, proj.out_features, bias=False, device=proj.weight.device)
    with torch.no_grad():
        bias_free.weight.copy_(proj.weight)
    model.embeds.proj = bias_free
    if type(model.embeds) is NaFlexEmbeds:
        model.embeds.__class__ = CpeTrainingEmbeds  # same state, RADIO's behaviour in training
    return model


# Parts of timm's ViT that RADIO's CPE forward never runs but its state dict keeps (e.g. the register
# tokens of RADIO's vit_*_v2 models: enable_cpe drops cls_token/pos_embed, not reg_token).
UNUSED_VIT_PARTS = ("reg_token", "fc_norm.", "head.", "attn_pool.")


def load_backbone(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> list[str]:
    """Load RADIO-named backbone tensors strictly: every one is used, none of the model's is missing.

    Returns the stored tensors of timm ViT parts that RADIO's forward never runs (left out, by name).
    """
    from timm.models.naflexvit import checkpoint_filter_fn

    unused = sorted(k for k in tensors if k.startswith(UNUSED_VIT_PARTS))
    tensors = {k: v.float() for k, v in tensors.items() if k not in unused}
    converted = checkpoint_filter_fn({f"radio_model.model.{k}": v for k, v in tensors.items()}, model)
    converted.pop("embeds.proj.bias", None)  # timm's converter adds a zero bias; RADIO's embedding has none
    if "embeds.reg_token" in converted and converted["embeds.reg_token"].shape[1] == 0:
        del converted["embeds.reg_token"]  # a single class token and no registers
    used = {"patch_generator.embedder.weight", "patch_generator.pos_embed", "patch_generator.cls_token.token"}
    used |= {k for k in tensors if k.startswith("blocks.")}
    if not isinstance(model.norm, nn.Identity):  # args.model_norm: RADIO kept the final norm
        converted.update({f"norm.{k[len('norm.') :]}": v for k, v in tensors.items() if k.startswith("norm.")})
        used |= {k for k in tensors if k.startswith("norm.")}
    extra = sorted(set(tensors) - used)
    if extra:
        raise ModelError(
            f"{where} holds {len(extra)} backbone tensors its args do not describe (e.g. {extra[:3]}): "
            "the args and the weights of this file disagree; load it with model.radio_repo_dir"
        )
    wanted = model.state_dict()
    _fit_position_grid(converted, wanted)
    missing = sorted(set(wanted) - set(converted))
    if missing:
        radio_names = [_radio_name(k) for k in missing[:3]]
        raise ModelError(f"{where} lacks {len(missing)} backbone tensors (e.g. {radio_names}): the file is incomplete")
    surplus = sorted(set(converted) - set(wanted))
    if surplus:
        raise ModelError(
            f"{where} holds {len(surplus)} backbone tensors its args do not describe "
            f"(e.g. {[_radio_name(k) for k in surplus[:3]]}): "
            "the args and the weights of this file disagree"
        )
    bad = [(k, tuple(converted[k].shape), tuple(v.shape)) for k, v in wanted.items() if converted[k].shape != v.shape]
    if bad:
        key, got, need = bad[0]
        raise ModelError(
            f"{where}: {_radio_name(key)} has shape {got} where its args describe {need} "
            f"({len(bad)} tensors differ): the args and the weights of this file disagree"
        )
    model.load_state_dict({k: converted[k] for k in wanted}, strict=True)
    return unused


def _fit_position_grid(converted: dict[str, torch.Tensor], wanted: Mapping[str, torch.Tensor]) -> None:
    # A grid stored at another max size is resized as RADIO's ViTPatchGenerator._load_embed does.
    stored, need = converted.get("embeds.pos_embed"), wanted.get("embeds.pos_embed")
    if stored is None or need is None or stored.shape == need.shape or stored.shape[-1] != need.shape[-1]:
        return
    grid = stored.permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=tuple(need.shape[1:3]), mode="bicubic", align_corners=True, antialias=False)
    converted["embeds.pos_embed"] = resized.permute(0, 2, 3, 1)


def _radio_name(timm_key: str) -> str:
    names = {
        "embeds.proj.weight": "patch_generator.embedder.weight",
        "embeds.pos_embed": "patch_generator.pos_embed",
        "embeds.cls_token": "patch_generator.cls_token.token",
        "embeds.reg_token": "patch_generator.cls_token.token",
    }
    return names.get(timm_key, timm_key.replace(".gamma", ".grandma"))

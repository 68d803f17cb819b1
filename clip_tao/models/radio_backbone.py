"""The RADIO image backbone on timm, laid out so that NVlabs/RADIO's ``{args, state_dict}`` checkpoints load.

A RADIO backbone is a timm ``VisionTransformer`` whose patch embedding, class token and position
embedding are replaced by a CPE ("cropped position embedding") patch generator: a bias-free linear
projection of flattened patches, a large position-embedding grid (``cpe_max_size / patch``, 128 x 128
for C-RADIOv3) that is resized to the input's patch grid, and one class token per teacher followed by
register tokens. The first tokens of the output are the per-teacher summaries; an adaptor head (an MLP)
maps the summary of its teacher into that teacher's embedding space.

Checkpoint layout (``args`` is an ``argparse.Namespace``): ``base_model.*`` (the ViT),
``input_conditioner.norm_mean/std``, ``_heads.<i>.*`` / ``_feature_projections.<i>.*`` (adaptor MLPs per
teacher ``i``, or keyed by teacher name in some releases).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_tao.errors import ModelError

# RADIO registers these ViT names in timm itself; timm does not ship them, so build them from their sizes.
RADIO_EXTRA_VITS = {
    "vit_tiny_patch14_224": dict(patch_size=14, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch14_224": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_224": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "vit_huge_patch16_224": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16),
    "vit_huge_patch16_224_mlpnorm": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16, mlp_norm=True),
    "vit_giant_patch16_224": dict(patch_size=16, embed_dim=1536, depth=40, num_heads=24),
    "vit_bigG_patch14_224": dict(patch_size=14, embed_dim=1664, depth=48, num_heads=16, init_values=1e-6),
}

# C-RADIOv3 was released with align_corners=True for the position-embedding resize (RADIO changed the
# default later for newer models; the v3 weights were trained with True).
POS_EMBED_ALIGN_CORNERS = True
# RADIO's enable_cpe default: during training each image's position embedding is dropped with this probability.
CPE_POS_DROPOUT = 0.1


def _arg(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


def create_timm_vit(args: Any, init_weights: bool = True) -> nn.Module:
    """The timm ``VisionTransformer`` named by ``args.model`` with ``args.model_kwargs`` (RADIO's training args)."""
    import timm
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    name = _arg(args, "model")
    kwargs = dict(_arg(args, "model_kwargs") or {})
    kwargs.pop("weight_init", None)
    common = {
        "num_classes": 0,  # RADIO's classification head is never used for embeddings
        "drop_path_rate": _arg(args, "drop_path"),
        "global_pool": _arg(args, "gp"),
        "weight_init": "" if init_weights else "skip",
    }
    common = {k: v for k, v in common.items() if v is not None}
    if name in RADIO_EXTRA_VITS:
        arch = dict(RADIO_EXTRA_VITS[name])
        if arch.pop("mlp_norm", False):
            arch["mlp_layer"] = _mlp_with_norm(Mlp)
        return VisionTransformer(**{**arch, **common, **kwargs})
    if not timm.is_model(name):
        raise ModelError(f"RADIO checkpoint names backbone {name!r}, which neither timm nor clip-tao knows")
    return timm.create_model(name, pretrained=False, **{**common, **kwargs})


def _mlp_with_norm(mlp_class):
    import functools

    return functools.partial(mlp_class, norm_layer=nn.LayerNorm)


class ClsTokens(nn.Module):
    """``num_tokens`` class tokens (one per teacher) followed by register tokens, prepended to the patches."""

    def __init__(self, dim: int, num_tokens: int, register_multiple: int | None, num_registers: int | None):
        super().__init__()
        self.num_tokens = num_tokens
        if num_registers:
            self.num_registers = num_registers
        elif register_multiple:
            # RADIO's rule: pad the token count up to the next multiple (a full multiple when already aligned).
            self.num_registers = register_multiple - (num_tokens % register_multiple)
        else:
            self.num_registers = 0
        self.token = nn.Parameter(torch.randn(num_tokens + self.num_registers, dim) * dim**-0.5)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.unsqueeze(0).expand(patches.shape[0], -1, -1), patches], dim=1)


class CpePatchGenerator(nn.Module):
    """Patches -> tokens with RADIO's cropped position embedding, class tokens and registers.

    Parameter names (``embedder.weight``, ``pos_embed``, ``cls_token.token``, ``patch_normalizer.*``)
    are RADIO's, so a checkpoint's ``base_model.patch_generator.*`` loads unchanged.
    """

    def __init__(
        self,
        patch_size: int,
        dim: int,
        input_size: int,
        max_size: int,
        num_cls_tokens: int,
        register_multiple: int | None = None,
        num_registers: int | None = None,
        normalize_patches: bool = False,
        pos_dropout: float = CPE_POS_DROPOUT,
    ):
        super().__init__()
        self.patch_size = patch_size
        max_size = int(math.ceil(max_size / patch_size) * patch_size)
        self.grid = max_size // patch_size
        self.cpe_mode = max_size != input_size
        self.pos_dropout = pos_dropout
        self.embedder = nn.Linear(3 * patch_size * patch_size, dim, bias=False)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * dim**-0.5)
        self.cls_token = ClsTokens(dim, num_cls_tokens, register_multiple, num_registers)
        self.patch_normalizer = nn.LayerNorm(dim) if normalize_patches else nn.Identity()

    @property
    def num_cls_tokens(self) -> int:
        return self.cls_token.num_tokens

    @property
    def num_skip(self) -> int:
        return self.cls_token.num_tokens + self.cls_token.num_registers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ModelError(f"RADIO needs image sizes that are multiples of {p}; got {height}x{width}")
        rows, cols = height // p, width // p
        # [B, C, rows*p, cols*p] -> [B, rows*cols, C*p*p] with (channel, y, x) order inside a patch, as RADIO.
        patches = images.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        tokens = self.embedder(patches.reshape(batch, rows * cols, channels * p * p))
        pos = self.position_embedding(batch, rows, cols)
        if self.training and self.pos_dropout > 0:
            keep = torch.rand(batch, 1, 1, device=tokens.device) > self.pos_dropout
            pos = torch.where(keep, pos, torch.zeros((), dtype=pos.dtype, device=pos.device))
        tokens = self.cls_token(tokens + pos)
        return self.patch_normalizer(tokens)

    def position_embedding(self, batch: int, rows: int, cols: int) -> torch.Tensor:
        """``[1 or B, rows*cols, D]``: the grid resized (eval) or randomly cropped and resized (training)."""
        if (rows, cols) == (self.grid, self.grid):
            return self.pos_embed
        grid = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        if self.cpe_mode and self.training:
            grid = self._random_window(grid, batch, rows, cols)
        elif self.cpe_mode:
            # Resize the whole grid to a square of the larger side, then keep the top-left window.
            side = max(rows, cols)
            grid = F.interpolate(
                grid.float(), size=(side, side), mode="bilinear", align_corners=POS_EMBED_ALIGN_CORNERS
            )
            grid = grid.to(self.pos_embed.dtype)[..., :rows, :cols]
        else:
            grid = grid[..., :rows, :cols]
        if grid.shape[-2:] != (rows, cols):
            grid = F.interpolate(grid.float(), size=(rows, cols), mode="bilinear", align_corners=True)
            grid = grid.to(self.pos_embed.dtype)
        return grid.flatten(2).transpose(1, 2)

    @staticmethod
    def _random_window(grid: torch.Tensor, batch: int, rows: int, cols: int) -> torch.Tensor:
        # RADIO's CPE training augmentation: each image samples a window of the grid with a random
        # scale in [sqrt(0.1), 1], aspect ratio in [3/4, 4/3] and position.
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
        out = F.grid_sample(
            grid.float().expand(batch, -1, -1, -1), sample_at, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        return out.to(grid.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained with another max size has another grid: resize it as RADIO does.
        key = f"{prefix}pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            src = state_dict[key]
            side = int(math.isqrt(src.shape[1]))
            src = src.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
            src = F.interpolate(src, size=(self.grid, self.grid), mode="bicubic", align_corners=True)
            state_dict[key] = src.flatten(2).transpose(1, 2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RadioBackbone(nn.Module):
    """CPE patch generator -> timm transformer blocks -> final norm: ``[B,3,H,W]`` -> ``[B, T, D]`` tokens.

    Input: images already normalised with the checkpoint's input-conditioner mean/std.
    """

    def __init__(self, args: Any, init_weights: bool = True):
        super().__init__()
        try:
            vit = create_timm_vit(args, init_weights)
        except TypeError as exc:  # model_kwargs that timm's VisionTransformer does not take
            raise ModelError(
                f"RADIO backbone {_arg(args, 'model')!r} with model_kwargs {_arg(args, 'model_kwargs')} cannot be "
                f"built on timm ({exc}): load it with model.radio_repo_dir (RADIO's own code)"
            ) from exc
        teachers = _arg(args, "teachers") or []
        per_teacher = bool(_arg(args, "cls_token_per_teacher", False))
        max_size = _arg(args, "cpe_max_size")
        if max_size is None:
            raise ModelError("this RADIO checkpoint has no CPE (args.cpe_max_size is None); only C-RADIO is supported")
        patch_size = vit.patch_embed.patch_size[0]
        self.patch_generator = CpePatchGenerator(
            patch_size=patch_size,
            dim=vit.embed_dim,
            input_size=vit.patch_embed.img_size[0],
            max_size=int(round(max_size / patch_size) * patch_size),
            num_cls_tokens=len(teachers) if per_teacher else 1,
            register_multiple=_arg(args, "register_multiple"),
            num_registers=_arg(args, "cpe_num_registers"),
            normalize_patches=not isinstance(vit.patch_embed.norm, nn.Identity),
        )
        # RADIO's forward runs exactly these three pieces of the timm model.
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.embed_dim = vit.embed_dim
        self.patch_size = patch_size
        self.grad_checkpointing = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_generator(images)
        if self.grad_checkpointing and torch.is_grad_enabled():
            from timm.models import checkpoint_seq

            tokens = checkpoint_seq(self.blocks, tokens)
        else:
            tokens = self.blocks(tokens)
        return self.norm(tokens)


class MlpHeadV2(nn.Module):
    """RADIO's "v2" adaptor MLP: fc1, residual (LayerNorm, GELU, Linear) blocks, then (LayerNorm, GELU, Linear)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_inner: int = 0, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = nn.Sequential(nn.LayerNorm(input_dim), nn.GELU()) if pre_norm else nn.Identity()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
            for _ in range(num_inner)
        )
        self.final = nn.Sequential(nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.pre_norm(x))
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)

    @classmethod
    def shape_from_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        """The constructor arguments that fit a head's state dict (keys without the head prefix)."""
        if "fc1.weight" not in state or "final.2.weight" not in state:
            if any(".parametrizations." in k for k in state):
                raise ModelError(
                    "the RADIO adaptor head is stored spectrally reparametrised, which clip-tao does not read; "
                    "load the model through model.radio_repo_dir instead"
                )
            raise ModelError(f"the RADIO adaptor head is not an MLP v2 head (keys: {sorted(state)[:4]}...)")
        hidden_dim, input_dim = state["fc1.weight"].shape
        num_inner = 0
        while f"blocks.{num_inner}.0.weight" in state:
            num_inner += 1
        return {
            "input_dim": input_dim,
            "hidden_dim": hidden_dim,
            "output_dim": state["final.2.weight"].shape[0],
            "num_inner": num_inner,
            "pre_norm": "pre_norm.0.weight" in state,
        }


# -- checkpoints ------------------------------------------------------------------------------------


def read_radio_checkpoint(path: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(args, state_dict)`` of a RADIO ``.pth.tar``, unpickling nothing but ``argparse.Namespace``.

    The EMA weights are preferred when present, as RADIO's own loader does.
    """
    if not os.path.isfile(path):
        raise ModelError(f"RADIO checkpoint {path!r} does not exist: give a c-radio .pth.tar file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"RADIO checkpoint {path!r} cannot be read safely: {first}") from exc
    if not isinstance(checkpoint, dict) or "args" not in checkpoint:
        raise ModelError(f"{path!r} is not a RADIO checkpoint (expected a dict with 'args' and 'state_dict')")
    state = checkpoint.get("state_dict_ema") or checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ModelError(f"RADIO checkpoint {path!r} has no 'state_dict'")
    # DDP/compile wrappers leave 'module.' / '_orig_mod.' in some files (what timm's clean_state_dict strips).
    state = {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}
    return checkpoint["args"], state


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def backbone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base_model.*`` with RADIO's LayerScale name ``grandma`` mapped back to timm's ``gamma``."""
    out = {}
    for key, value in sub_state(state, "base_model.").items():
        if key.endswith(".grandma"):
            key = key[: -len("grandma")] + "gamma"
        out[key] = value
    return out


def head_state(state: Mapping[str, torch.Tensor], index: int, name: str) -> dict[str, torch.Tensor]:
    """The summary head of teacher ``index`` (``_heads.<index>.*``; some releases key by teacher ``name``)."""
    found = sub_state(state, f"_heads.{index}.")
    return found or sub_state(state, f"_heads.{name}.")


def load_backbone_weights(backbone: RadioBackbone, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Strictly for the parts RADIO runs; the classifier head and unused norms of the timm model are skipped."""
    wanted = backbone.state_dict()
    stored = backbone_state(state)
    weights = {k: v for k, v in stored.items() if k in wanted}
    # Weights of the parts RADIO runs that this architecture has no place for (e.g. LayerScale that the
    # args did not ask for) would be silently dropped: refuse instead.
    extra = sorted(k for k in stored if k not in wanted and k.startswith(("blocks.", "norm.", "patch_generator.")))
    if extra:
        raise ModelError(
            f"RADIO checkpoint {path!r} holds {len(extra)} backbone weights its args do not describe "
            f"(e.g. {extra[:3]}): load it with model.radio_repo_dir (RADIO's own code)"
        )
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise ModelError(
            f"RADIO checkpoint {path!r} lacks {len(missing)} backbone weights (e.g. {missing[:3]}): "
            "its args do not describe the stored model"
        )
    bad = [k for k, v in weights.items() if k != "patch_generator.pos_embed" and v.shape != wanted[k].shape]
    if bad:
        raise ModelError(f"RADIO checkpoint {path!r}: shapes of {bad[:3]} do not fit the architecture in its args")
    backbone.load_state_dict(weights, strict=True)

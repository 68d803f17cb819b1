"""PEFT (``peft`` section): TAO 7.3's per-tower modes, with LoRA built on Hugging Face's ``peft`` library.

With ``peft.enabled``, as TAO 7.3 does: every parameter is frozen, then each tower takes its ``mode`` (``frozen``:
stays so; ``full``: the whole tower trains; ``lora``: adapters train), overriding ``model.freeze_*`` in both
directions (one warning names the disagreement); ``train_logit_calibration`` keeps the logit scale and bias
trainable. The legacy per-tower ``enabled`` (TAO 7.2) means lora (true) or frozen (false).

Which modules get adapters follows TAO's keys: per tower, the transformer blocks (the last
``num_last_blocks``, 0 = all) and, inside a block, every ``nn.Linear`` whose name relative to the block
contains one of ``target_modules``; those get ``peft``'s LoRA layers.

open_clip's fused attention (``nn.MultiheadAttention``) has no ``qkv`` child: it is matched under the name
``<attn>.qkv`` as well as its own, and a match on its ``out_proj`` counts as a match on it, because the
module never calls ``out_proj`` (it hands the weights to a functional kernel, so an adapter there would be
silently unused). Its weights ``in_proj_weight`` and ``out_proj.weight`` get a low-rank delta through
``torch.nn.utils.parametrize`` (W + alpha/rank * B A, computed on access): the frozen base weights are never
modified, unlike ``peft``'s own MultiheadAttention layer, which merges and subtracts around every forward
and so lets them drift by rounding. LoRA dropout, defined on the layer input, does not apply to these.

Only the adapters and the logit scale/bias train. The model's state dict then holds the base weights
and the adapters (``...lora_A``/``lora_B``), so a checkpoint is the full state. :func:`merge_lora` folds
the adapters into the base weights and puts the original modules back, leaving the plain architecture
(its state dict keys are the un-adapted model's): this is what evaluation, inference and export use.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from clip_tao.config.schema import LoraTargetConfig, PeftConfig
from clip_tao.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER = "default"
# ``...<container>.<index>.`` names a transformer block in timm (blocks), open_clip (resblocks),
# transformers (layers / layer) and GPT-style (h) models.
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|resblocks|layers|layer|h)\.(\d+)\.")
_LORA_KEY = re.compile(r"\.lora_[AB](\.|$)")


def has_lora_weights(state: dict[str, Any]) -> bool:
    """True for a state dict of a model with LoRA adapters (a clip-tao peft checkpoint)."""
    return any(_LORA_KEY.search(key) for key in state)


def lora_targets(model: nn.Module, tower: str, cfg: LoraTargetConfig) -> list[str]:
    """Full module names that get an adapter in ``tower`` (``vision`` or ``text``)."""
    tower_params = {id(p) for p in (model.vision_parameters() if tower == "vision" else model.text_parameters())}
    blocks: dict[str, list[tuple[str, str, nn.Module]]] = {}  # block prefix -> (name, relative name, module)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.MultiheadAttention)):
            continue
        own = list(module.parameters(recurse=False))
        if not own or id(own[0]) not in tower_params:
            continue
        found = list(_BLOCK.finditer(name))
        if not found:
            continue  # not inside a transformer block (embeddings, heads, projections)
        last = found[-1]
        prefix = name[: last.end()]
        blocks.setdefault(prefix, []).append((name, name[last.end() :], module))
    if not blocks:
        raise ConfigError(f"peft.{tower}: the model's {tower} tower has no transformer blocks LoRA can adapt")
    ordered = sorted(blocks, key=lambda p: [int(i) for i in re.findall(r"\.(\d+)\.", "." + p)])
    chosen = ordered[-cfg.num_last_blocks :] if cfg.num_last_blocks else ordered
    targets: list[str] = []
    attention: set[str] = set()
    for prefix in chosen:
        for name, rel, module in blocks[prefix]:
            aliases = [rel, f"{rel}.qkv"] if isinstance(module, nn.MultiheadAttention) else [rel]
            if any(t in alias for t in cfg.target_modules for alias in aliases):
                targets.append(name)
                if isinstance(module, nn.MultiheadAttention):
                    attention.add(name)
    # nn.MultiheadAttention never calls its out_proj module (it passes the weights to a functional kernel),
    # so an adapter there would be silently unused: adapt the attention itself, whose peft layer covers
    # the fused input and the output projection. And do not target that child again.
    modules = dict(model.named_modules())
    for i, name in enumerate(targets):
        parent = name.rsplit(".", 1)[0]
        if isinstance(modules.get(parent), nn.MultiheadAttention):
            targets[i] = parent
            attention.add(parent)
    targets = list(dict.fromkeys(n for n in targets if n.rsplit(".", 1)[0] not in attention))
    if not targets:
        example = sorted({rel for rel_list in blocks.values() for _, rel, _ in rel_list})
        raise ConfigError(
            f"peft.{tower}.target_modules={cfg.target_modules} matches no module in the {tower} tower's blocks; "
            f"its block modules are: {', '.join(example)}"
        )
    return targets


def tower_modes(peft_cfg: PeftConfig) -> dict[str, str]:
    """``{"vision": mode, "text": mode}`` with each mode frozen, full or lora."""
    return {t: getattr(peft_cfg, t).resolved_mode() for t in ("vision", "text")}


def freeze_conflicts(peft_cfg: PeftConfig, freeze: dict[str, bool]) -> str | None:
    """One line naming the towers whose ``model.freeze_*`` the PEFT mode overrides, else None."""
    parts = []
    for tower, mode in tower_modes(peft_cfg).items():
        frozen = bool(freeze.get(tower))
        if frozen != (mode == "frozen"):
            parts.append(f"model.freeze_{tower}_encoder={str(frozen).lower()} but peft.{tower}.mode={mode}")
    if not parts:
        return None
    return "; ".join(parts) + " (with peft.enabled the tower modes decide, as in TAO 7.3)"


def apply_lora(model: nn.Module, peft_cfg: PeftConfig, freeze: dict[str, bool] | None = None) -> dict[str, Any]:
    """Apply the towers' modes (adapters for ``lora`` towers) and the logit calibration rule.

    ``freeze``: ``{"vision": bool, "text": bool}`` from ``model.freeze_*_encoder``; the modes override them, and
    a disagreement is logged once. Returns the counts :func:`describe` prints.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if peft_cfg.method != "lora":
        raise ConfigError(f"peft.method={peft_cfg.method!r} is not supported; use lora")
    modes = tower_modes(peft_cfg)
    conflict = freeze_conflicts(peft_cfg, freeze) if freeze is not None else None
    if conflict:
        log.warning(conflict)
    legacy = [t for t in modes if getattr(peft_cfg, t).mode == "legacy" and getattr(peft_cfg, t).enabled]
    if legacy:
        log.info("peft.%s.enabled is TAO 7.2's switch; TAO 7.3 writes peft.%s.mode: lora", legacy[0], legacy[0])
    towers = [t for t, mode in modes.items() if mode == "lora"]
    # Resolve both towers' targets before changing the model (module names move under base_layer).
    plan = {tower: lora_targets(model, tower, getattr(peft_cfg, tower)) for tower in towers}
    modules = dict(model.named_modules())
    for tower in towers:
        cfg = getattr(peft_cfg, tower)
        fused = [n for n in plan[tower] if isinstance(modules[n], nn.MultiheadAttention)]
        linear = [n for n in plan[tower] if n not in fused]
        for name in fused:
            _adapt_fused_attention(modules[name], cfg.rank, cfg.alpha)
        if not linear:
            continue
        config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=linear, bias="none"
        )
        with warnings.catch_warnings():
            # peft warns when a model gets a second config; the towers' adapters are disjoint, as intended.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.train(model.training)  # new adapter modules (their dropout) take the model's mode
    for name, param in model.named_parameters():
        param.requires_grad_(bool(_LORA_KEY.search(f".{name}")))
    for tower, mode in modes.items():
        if mode == "full":
            for param in model.vision_parameters() if tower == "vision" else model.text_parameters():
                param.requires_grad_(True)
    for param in model.logit_parameters():
        param.requires_grad_(peft_cfg.train_logit_calibration)
    counts = trainable_counts(model)
    counts.update(modes=modes, adapted_modules=sum(len(v) for v in plan.values()))
    if counts["trainable"] == 0:
        raise ConfigError(
            "peft.enabled=true leaves nothing to train: both towers are frozen and "
            "peft.train_logit_calibration=false; set a tower's mode to lora or full"
        )
    return counts


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per tower and of the logit calibration, and the totals."""
    logits = {id(p) for p in model.logit_parameters()}

    def count(params) -> int:
        return sum(p.numel() for p in params if p.requires_grad and id(p) not in logits)

    return {
        "vision": count(model.vision_parameters()),
        "text": count(model.text_parameters()),
        "logit": sum(p.numel() for p in model.logit_parameters() if p.requires_grad),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


class LowRankDelta(nn.Module):
    """A parametrization ``W -> W + scaling * lora_B @ lora_A`` (B starts at zero, as in LoRA)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: int, like: torch.Tensor):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)  # peft's default initialisation of A
        self.scaling = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A) * self.scaling


def _adapt_fused_attention(attention: nn.MultiheadAttention, rank: int, alpha: int) -> None:
    if attention.in_proj_weight is None:
        raise ConfigError("LoRA on an nn.MultiheadAttention with separate q/k/v weights is not supported")
    for owner, name in ((attention, "in_proj_weight"), (attention.out_proj, "weight")):
        weight = getattr(owner, name)
        delta = LowRankDelta(weight.shape[0], weight.shape[1], rank, alpha, weight)
        parametrize.register_parametrization(owner, name, delta)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and put the original modules back (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in layers:
        module.merge()
        plain = module.get_base_layer()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, plain)
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                if any(isinstance(p, LowRankDelta) for p in module.parametrizations[name]):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def peft_from_checkpoint(checkpoint: dict[str, Any], fallback: PeftConfig) -> PeftConfig:
    """The ``peft`` section a checkpoint was trained with (its saved spec), else ``fallback``."""
    saved = (checkpoint.get("config") or {}).get("peft") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        return fallback
    towers = {t: LoraTargetConfig(**saved.get(t, {})) for t in ("vision", "text")}
    calibration = saved.get("train_logit_calibration", True)
    return PeftConfig(enabled=True, method=saved.get("method", "lora"), train_logit_calibration=calibration, **towers)


def describe(counts: dict[str, Any]) -> str:
    """The start-of-run line: trainable parameters per tower (with its PEFT mode) and in all."""
    modes = counts.get("modes") or {}

    def tower(name: str) -> str:
        mode = f" ({modes[name]})" if name in modes else ""
        return f"{name}{mode} {counts[name]:,}"

    adapted = f", {counts['adapted_modules']} modules with LoRA" if "adapted_modules" in counts else ""
    return (
        f"trainable parameters: {tower('vision')}, {tower('text')}, logit scale/bias {counts['logit']:,}; "
        f"{counts['trainable']:,} of {counts['total']:,} ({100 * counts['trainable'] / max(counts['total'], 1):.2f} %)"
        f"{adapted}"
    )

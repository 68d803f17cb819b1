"""LoRA fine-tuning (``peft`` section, TAO 7.0.1 keys) built on Hugging Face's ``peft`` library.

Which modules get adapters follows TAO's keys: per tower, the transformer blocks (the last
``num_last_blocks``, 0 = all) and, inside a block, every ``nn.Linear`` whose name relative to the block
contains one of ``target_modules``. open_clip's fused attention (``nn.MultiheadAttention``, which has no
``qkv`` child) is matched under the name ``<attn>.qkv`` as well as its own, and is adapted by ``peft``'s
MultiheadAttention layer, which covers its fused input projection and its output projection.

Only the adapters and the logit scale/bias train. The model's state dict then holds the base weights
(``...base_layer...``) and the adapters (``...lora_A/lora_B...``), so a checkpoint is the full state.
:func:`merge_lora` folds the adapters into the base weights and puts the original modules back, leaving
the plain architecture (its state dict keys are the un-adapted model's): this is what evaluation,
inference and export use.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from torch import nn

from clip_tao.config.schema import LoraTargetConfig, PeftConfig
from clip_tao.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER = "default"
# ``...<container>.<index>.`` names a transformer block in timm (blocks), open_clip (resblocks),
# transformers (layers / layer) and GPT-style (h) models.
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|resblocks|layers|layer|h)\.(\d+)\.")
_LORA_KEY = re.compile(r"\.lora_[AB]\.")


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
    # peft's MultiheadAttention layer adapts its out_proj itself: do not target that child again.
    targets = [n for n in targets if n.rsplit(".", 1)[0] not in attention]
    if not targets:
        example = sorted({rel for rel_list in blocks.values() for _, rel, _ in rel_list})
        raise ConfigError(
            f"peft.{tower}.target_modules={cfg.target_modules} matches no module in the {tower} tower's blocks; "
            f"its block modules are: {', '.join(example)}"
        )
    return targets


def apply_lora(model: nn.Module, peft_cfg: PeftConfig, freeze: dict[str, bool] | None = None) -> dict[str, int]:
    """Inject adapters per ``peft_cfg`` and freeze everything else but the logit scale/bias.

    ``freeze``: ``{"vision": bool, "text": bool}`` from ``model.freeze_*_encoder`` (adapting a frozen tower
    is a contradiction, refused). Returns ``{"trainable": n, "total": n, "adapted_modules": n}``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if peft_cfg.method != "lora":
        raise ConfigError(f"peft.method={peft_cfg.method!r} is not supported; use lora")
    towers = [t for t in ("vision", "text") if getattr(peft_cfg, t).enabled]
    if not towers:
        raise ConfigError("peft.enabled=true but neither peft.vision.enabled nor peft.text.enabled is true")
    for tower in towers:
        if (freeze or {}).get(tower):
            raise ConfigError(
                f"peft.{tower}.enabled=true but model.freeze_{tower}_encoder=true: LoRA trains adapters of that "
                f"tower; set one of them to false"
            )
    # Resolve both towers' targets before changing the model (module names move under base_layer).
    plan = {tower: lora_targets(model, tower, getattr(peft_cfg, tower)) for tower in towers}
    for tower in towers:
        cfg = getattr(peft_cfg, tower)
        config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=plan[tower], bias="none"
        )
        with warnings.catch_warnings():
            # peft warns when a model gets a second config; the towers' adapters are disjoint, as intended.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.train(model.training)  # new adapter modules (their dropout) take the model's mode
    for name, param in model.named_parameters():
        param.requires_grad_(bool(_LORA_KEY.search(f".{name}")))
    for param in model.logit_parameters():
        param.requires_grad_(True)
    counts = {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "adapted_modules": sum(len(v) for v in plan.values()),
    }
    return counts


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and put the original modules back (in place).

    Outermost adapter layers only: peft's MultiheadAttention layer merges and unwraps its own out_proj
    (and turns its merged weights back into parameters) in ``unload_and_optionally_merge_module``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    outer = [(n, m) for n, m in layers if not any(n.startswith(other + ".") for other, _ in layers)]
    for name, module in outer:
        if hasattr(module, "unload_and_optionally_merge_module"):
            plain = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            module.merge()
            plain = module.get_base_layer()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, plain)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def peft_from_checkpoint(checkpoint: dict[str, Any], fallback: PeftConfig) -> PeftConfig:
    """The ``peft`` section a checkpoint was trained with (its saved spec), else ``fallback``."""
    saved = (checkpoint.get("config") or {}).get("peft") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        return fallback
    towers = {t: LoraTargetConfig(**saved.get(t, {})) for t in ("vision", "text")}
    return PeftConfig(enabled=True, method=saved.get("method", "lora"), **towers)


def describe(counts: dict[str, int]) -> str:
    return (
        f"LoRA: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
        f"({100 * counts['trainable'] / max(counts['total'], 1):.2f} %), {counts['adapted_modules']} modules adapted"
    )

"""TAO-trained checkpoints: Lightning files of TAO 7.0.1's CLIP task, mapped to our models' keys.

TAO saves ``CLIPPlModel`` with Lightning (``model_epoch_{epoch:03d}_step_{step:05d}.pth``, ``clip_latest.pth``): a dict with
``state_dict``, ``epoch``, ``global_step``, ``pytorch-lightning_version``, ``optimizer_states`` ...
The ``state_dict`` keys are those of TAO's adapter under the Lightning module's ``model.`` attribute:

- ``model.logit_scale``, ``model.logit_bias``: the adapter's own (trained) logit parameters;
- ``model.backbone.inner.*``: the Hugging Face SigLIP/SigLIP2 model (SigLIP2 types);
- ``model.backbone.model.*``: the open_clip ``CLIP`` (NV-CLIP and other open_clip types);
- ``model.backbone.head.*``: a classification head TAO's backbone wrapper may carry (unused by CLIP);
- ``model.radio_model.*`` (and ``model.adaptor.*``, the same adaptor registered twice): RADIO's hub model.

The backbones' own logit parameters (``...inner.logit_scale``) are not the ones TAO 7.0.1 trains: the adapter's
win. TAO 7.3 moved the calibration into the source model (``model.backbone.inner.logit_scale`` ...): a checkpoint
without the adapter's copy takes the backbone's (an OpenCLIP source without a bias has none: 0, as its logits).

TAO 7.3's LoRA checkpoints hold each adapted ``nn.Linear`` at ``P`` as TAO's ``LoRALinear``: ``P.original.weight``
(and ``.bias``), ``P.lora_A`` [r, in], ``P.lora_B`` [out, r] and the buffer ``P.scaling`` (alpha / r; absent in
its earliest version). :func:`merge_tao_lora` folds them into ``P.weight = W + scaling * B @ A``, so every task
gets the plain model.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from clip_tao.config.schema import PeftConfig
from clip_tao.errors import ModelError

log = logging.getLogger(__name__)

LIGHTNING_MARKER = "pytorch-lightning_version"
# TAO backbone prefix -> (what it is, the attribute under which our wrappers keep that library's model, its package)
_BACKBONES = {
    "model.backbone.inner.": ("a transformers SigLIP/SigLIP2", "model.", "transformers"),
    "model.backbone.model.": ("an open_clip CLIP", "model.", "open_clip"),
}
_RADIO = "model.radio_model."
_IGNORED = ("model.backbone.head.", "model.adaptor.")


def is_lightning_checkpoint(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and LIGHTNING_MARKER in checkpoint and "state_dict" in checkpoint


def tao_state_to_ours(
    model: nn.Module, checkpoint: dict, path: str, peft: PeftConfig | None = None
) -> dict[str, torch.Tensor]:
    """Our model's state dict from a TAO CLIP Lightning checkpoint (keys renamed, LoRA merged, nothing else).

    ``peft``: the spec's section, read only for a LoRA checkpoint without its ``scaling`` buffers.
    """
    state = checkpoint["state_dict"]
    found = [prefix for prefix in (*_BACKBONES, _RADIO) if any(k.startswith(prefix) for k in state)]
    own_scale = bool(found) and f"{found[0]}logit_scale" in state and found[0] != _RADIO
    if "model.logit_scale" not in state and not own_scale:
        raise ModelError(
            f"{path!r} is a Lightning checkpoint but not of TAO's CLIP task (no model.logit_scale key; "
            f"its keys start {sorted({k.split('.')[0] for k in state})[:3]}): give a checkpoint of `tao model clip train`"
        )
    if not found:
        raise ModelError(f"{path!r}: TAO CLIP checkpoint without model.backbone.* or model.radio_model.* weights")
    state = merge_tao_lora(state, peft, path)
    ours = _our_logit_names(model)
    prefix = found[0]
    if prefix == _RADIO:
        mapped = _radio_state(model, state, path)
    else:
        library, target, package = _BACKBONES[prefix]
        wrapped = getattr(model, target.rstrip("."), None)
        if wrapped is None or not type(wrapped).__module__.startswith(package):
            raise ModelError(
                f"{path!r} holds {library} model (TAO keys {prefix}*), which model.type={model.model_type} is not: "
                "set model.type to the type it was trained as"
            )
        mapped = {target + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    # TAO's adapter keeps scalars ([]); a backbone's own may be [1]: take our parameter's shape.
    scale_key = "model.logit_scale" if "model.logit_scale" in state else f"{prefix}logit_scale"
    _note_two_calibrations(state, prefix, path)
    bias_key = "model.logit_bias" if "model.logit_scale" in state else f"{prefix}logit_bias"
    mapped[ours["scale"]] = state[scale_key].reshape(model.logit_scale.shape)
    if bias_key in state:
        mapped[ours["bias"]] = state[bias_key].reshape(model.logit_bias.shape)
    elif scale_key != "model.logit_scale":
        # TAO 7.3 keeps a bias-free source (OpenCLIP) without one: its logits have none, which is a bias of 0.
        mapped[ours["bias"]] = torch.zeros_like(model.logit_bias)
        log.info("%s: the source model has no logit bias (TAO 7.3 keeps none): 0", path)
    dropped = [k for k in state if k.startswith(_IGNORED)]
    if dropped:
        log.info("%s: left out %d tensors TAO keeps for other uses (%s ...)", path, len(dropped), dropped[0])
    return mapped


_TAO_LORA = re.compile(r"^(?P<path>.+)\.original\.weight$")
# Where a wrapped layer lives tells its tower (TAO's SigLIP2, RADIO and OpenCLIP layouts).
_VISION_PATHS = (".vision_model.", "model.radio_model.model.", ".visual.")


def merge_tao_lora(state: dict, peft: PeftConfig | None, path: str) -> dict:
    """TAO 7.3's ``LoRALinear`` layers folded into plain ``nn.Linear`` weights: ``W + scaling * B @ A``."""
    wrapped = [m["path"] for k in state if (m := _TAO_LORA.match(k)) and f"{m['path']}.lora_A" in state]
    if not wrapped:
        return state
    without = [p for p in wrapped if f"{p}.scaling" not in state]
    if without and len(without) != len(wrapped):
        raise ModelError(
            f"{path!r}: {len(without)} of {len(wrapped)} LoRA layers lack their scaling (e.g. {without[0]}.scaling): "
            "the file is damaged or mixes two versions"
        )
    out = dict(state)
    for layer in wrapped:
        lora_a, lora_b = out.pop(f"{layer}.lora_A"), out.pop(f"{layer}.lora_B")
        weight = out.pop(f"{layer}.original.weight")
        scaling = out.pop(f"{layer}.scaling", None)
        if scaling is None:
            scaling = _scaling_from_spec(layer, lora_a, peft, path)
        if lora_b.shape[1] != lora_a.shape[0] or (lora_b.shape[0], lora_a.shape[1]) != tuple(weight.shape):
            raise ModelError(
                f"{path!r}: {layer}: lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)} do not fit the "
                f"weight {list(weight.shape)}"
            )
        delta = (lora_b.double() @ lora_a.double()) * float(scaling)
        out[f"{layer}.weight"] = (weight.double() + delta).to(weight.dtype)
        if f"{layer}.original.bias" in out:
            out[f"{layer}.bias"] = out.pop(f"{layer}.original.bias")
    if without:
        log.warning(
            "%s: TAO LoRA checkpoint without scaling buffers: alpha/rank of the spec's peft section used for %d "
            "layers (they must be the training run's)",
            path, len(without),
        )  # fmt: skip
    log.info("%s: %d TAO LoRA layers merged into the weights", path, len(wrapped))
    return out


def _scaling_from_spec(layer: str, lora_a: torch.Tensor, peft: PeftConfig | None, path: str) -> float:
    tower = "vision" if any(p in f".{layer}" for p in _VISION_PATHS) else "text"
    cfg = getattr(peft, tower) if peft is not None else None
    rank = lora_a.shape[0]
    if peft is None or not peft.enabled or cfg.resolved_mode() != "lora" or cfg.rank != rank:
        described = "no LoRA" if cfg is None or not peft.enabled else f"mode {cfg.resolved_mode()}, rank {cfg.rank}"
        raise ModelError(
            f"{path!r}: {layer} is a rank-{rank} LoRA layer without its scaling, and the spec's peft.{tower} "
            f"({described}) does not describe it: give this task the training spec's peft section"
        )
    return cfg.alpha / cfg.rank


def _note_two_calibrations(state: dict, prefix: str, path: str) -> None:
    """A checkpoint from before TAO 7.3's calibration change holds the adapter's logit parameters and the source
    model's. TAO 7.3 refuses such files; here the adapter's are used, as TAO 7.0.1's forward did."""
    for name in ("logit_scale", "logit_bias"):
        outer, inner = state.get(f"model.{name}"), state.get(f"{prefix}{name}")
        if outer is None or inner is None or prefix == _RADIO:
            continue
        if outer.numel() == inner.numel() == 1 and float(outer.flatten()[0]) != float(inner.flatten()[0]):
            log.warning(
                "%s: checkpoint from before TAO 7.3's calibration change: model.%s=%.6g (used, as TAO 7.0.1's "
                "forward) and %s%s=%.6g (left out)",
                path, name, float(outer.flatten()[0]), prefix, name, float(inner.flatten()[0]),
            )  # fmt: skip


def _our_logit_names(model: nn.Module) -> dict[str, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {"scale": names[id(model.logit_scale)], "bias": names[id(model.logit_bias)]}


def _radio_state(model: nn.Module, state: dict, path: str) -> dict[str, torch.Tensor]:
    """``model.radio_model.*`` is RADIO's ``RADIOModel`` (TAO's adapter holds it as ``radio_model``).

    The Lightning prefix ``model.`` is stripped and the rest handed to the Radio-CLIP family's reader of
    that layout (``checkpoint_from_radio_model_state``) and its loaders. A model built by RADIO's own code
    (``model.radio_repo_dir``) keeps the hub model under ``visual.radio``: there the keys map one to one.
    The adaptor's text tower maps onto ours: the SigLIP adaptor's (``adaptors.<name>.text_model.*``) and the
    OpenCLIP adaptor's (``adaptors.<name>.oc_model.*``, see :func:`_open_clip_text_state`).
    """
    from clip_tao.models.radio_checkpoint import checkpoint_from_radio_model_state

    inner = {k[len("model.") :]: v for k, v in state.items() if k.startswith(_RADIO)}  # radio_model.*
    visual = getattr(model, "visual", None)
    if visual is None or not (hasattr(visual, "radio") or hasattr(visual, "backbone")):
        raise ModelError(
            f"{path!r} holds a Radio-CLIP model (TAO keys {_RADIO}*), which model.type={model.model_type} is not: "
            "set model.type to the c-radio type it was trained as"
        )
    adaptors = sorted({k.split(".")[2] for k in inner if k.startswith("radio_model.adaptors.")})
    if len(adaptors) != 1:
        raise ModelError(f"{path!r}: expected one RADIO adaptor in the checkpoint, found {adaptors or 'none'}")
    name = adaptors[0]
    text_prefix = f"radio_model.adaptors.{name}.text_model."
    text = {k[len(text_prefix) :]: v for k, v in inner.items() if k.startswith(text_prefix)}
    open_clip_prefix = f"radio_model.adaptors.{name}.oc_model."
    open_clip_text = {k[len(open_clip_prefix) :]: v for k, v in inner.items() if k.startswith(open_clip_prefix)}
    own = model.state_dict()
    if hasattr(visual, "radio"):
        hub_own = visual.radio.state_dict()
        mapped = {f"visual.radio.{k[len('radio_model.') :]}": v for k, v in inner.items()
                  if k[len("radio_model.") :] in hub_own}  # fmt: skip
    else:
        rest = {k: v for k, v in inner.items() if not k.startswith((text_prefix, open_clip_prefix))}
        _load_radio_image_tower(visual, checkpoint_from_radio_model_state(rest, {}, path, path=path), name, path)
        mapped = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    # RADIO keeps the teacher's text transformer; ours is the teacher's text model around it (whose keys,
    # depending on the transformers version, carry a "text_model." level or not).
    ours = next(
        (p for p in ("text.model.", "text.model.text_model.") if text and all(p + k in own for k in text)), None
    )
    if open_clip_text:
        mapped.update(_open_clip_text_state(model, open_clip_text, name, path))
    elif ours:
        mapped.update({ours + k: v for k, v in text.items()})
    else:
        log.warning("%s: the %s adaptor's text tower is not mapped; the text tower keeps its own weights", path, name)
    for key, value in own.items():
        if key.startswith("text.") and key not in mapped:
            mapped[key] = value
    return mapped


# The open_clip model's own logit parameters: TAO trains and saves its adapter's (model.logit_scale/bias) instead.
_OPEN_CLIP_UNUSED = ("logit_scale", "logit_bias")


def _open_clip_text_state(model: nn.Module, tensors: dict, adaptor: str, path: str) -> dict[str, torch.Tensor]:
    """RADIO's OpenCLIP adaptor (``radio/open_clip_adaptor.py``) keeps the teacher's whole open_clip ``CLIP`` as
    ``oc_model`` with ``visual`` set to None, so ``oc_model.*`` is its text tower at the model's top level
    (``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``) plus
    its logit parameters. TAO encodes text with ``oc_model.encode_text``; ours is the same text transformer."""
    from clip_tao.models.text_towers import OpenClipTextTower

    where = f"{path!r}: the {adaptor} adaptor's open_clip text tower (radio_model.adaptors.{adaptor}.oc_model.*)"
    tower = getattr(model, "text", None)
    if not isinstance(tower, OpenClipTextTower):
        raise ModelError(f"{where} does not fit this model's text tower: set model.adaptor_name to {adaptor}")
    own = tower.model.state_dict()
    unused = sorted(k for k in tensors if k in _OPEN_CLIP_UNUSED)
    unknown = sorted(k for k in tensors if k not in own and k not in _OPEN_CLIP_UNUSED)
    missing = sorted(k for k in own if k not in tensors)
    if unknown or missing:
        raise ModelError(
            f"{where} does not fit the teacher's text tower: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unknown)} unknown (e.g. {unknown[:2]}); set model.adaptor_name/text_pretrained_path to the "
            "teacher it was trained with"
        )
    for key, value in own.items():
        if tensors[key].shape != value.shape:
            raise ModelError(
                f"{where}: oc_model.{key} has shape {list(tensors[key].shape)}, the teacher's text tower "
                f"{list(value.shape)}; set model.text_pretrained_path to the teacher it was trained with"
            )
    if unused:
        log.info("%s: left out the open_clip model's own %s (TAO trains its adapter's)", path, ", ".join(unused))
    return {f"text.model.{k}": tensors[k] for k in own}


def _load_radio_image_tower(visual: nn.Module, ckpt, adaptor: str, path: str) -> None:
    from clip_tao.models.radio_backbone import load_backbone

    load_backbone(visual.backbone, ckpt.backbone, path)
    head = ckpt.heads.get(adaptor)
    if not head:
        raise ModelError(f"{path!r} has no summary head for the {adaptor} adaptor (head_mlp.*)")
    try:
        visual.head.load_state_dict(head)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path!r}: the {adaptor} adaptor head does not fit this model: {first}") from exc

"""Load a weight file into a built model, whatever wrote it: clip-tao (full or LoRA), TAO's Lightning, bare.

Every task that takes a checkpoint (``evaluate.checkpoint``, ``inference.checkpoint``, ``export.checkpoint``,
``train.pretrained_model_path``) comes through :func:`load_weights`. Files are read with
``torch.load(weights_only=True)``; Lightning files need no class beyond that. A sharded checkpoint folder (FSDP
training, ``torch.distributed.checkpoint``) is read whole in this process.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from clip_tao.config.schema import PeftConfig
from clip_tao.engine.checkpoint import load_checkpoint, model_state_from
from clip_tao.engine.lora import apply_lora, has_lora_weights, merge_lora, peft_from_checkpoint
from clip_tao.engine.tao_checkpoint import is_lightning_checkpoint, tao_state_to_ours
from clip_tao.errors import ModelError

log = logging.getLogger(__name__)


def load_weights(model: nn.Module, path: str, peft: PeftConfig | None = None) -> dict[str, Any]:
    """Load ``path`` into ``model`` strictly; LoRA adapters in it are merged. Returns the checkpoint.

    ``peft`` describes the adapters when the checkpoint does not carry its own spec.
    """
    checkpoint = load_checkpoint(path)
    current = getattr(model, "model_type", None)
    if is_lightning_checkpoint(checkpoint):
        state = tao_state_to_ours(model, checkpoint, path, peft)
        log.info("%s: TAO Lightning checkpoint (epoch %s, step %s)", path, checkpoint.get("epoch"),
                 checkpoint.get("global_step"))  # fmt: skip
    else:
        saved = checkpoint.get("model_type")
        if saved and current and saved != current:
            raise ModelError(
                f"checkpoint {path!r} was trained as model.type={saved}, but the spec says {current}: "
                f"set model.type={saved}"
            )
        state = model_state_from(checkpoint, path)
    lora = has_lora_weights(state)
    if lora:
        apply_lora(model, peft_from_checkpoint(checkpoint, peft or PeftConfig()))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shapes
        detail = " ".join(str(exc).split())
        raise ModelError(f"checkpoint {path!r} does not fit model.type={current}: {detail[:300]}") from exc
    if missing or unexpected:
        detail = (
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
        raise ModelError(f"checkpoint {path!r} does not fit model.type={current}: {detail}")
    if lora:
        merge_lora(model)
        log.info("%s: LoRA adapters merged into the weights", path)
    return checkpoint

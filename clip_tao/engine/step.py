"""Forward and backward of one optimiser step, over one batch or several accumulated micro-batches.

Contrastive losses do not decompose over micro-batches (every pair is a negative of every other), so
accumulation follows open_clip's ``--accum-freq``: first embed every micro-batch without gradients and
cache the features, then re-run each micro-batch with gradients and compute the loss over *all* cached
features with that micro-batch's live ones in place. The sum of these backward passes is the gradient
of the loss on the whole accumulated batch. The logit scale and bias enter the loss directly, so only
the last pass lets their gradient through; the others use them detached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from clip_tao.engine.device import Precision
from clip_tao.engine.distributed import no_gradient_sync
from clip_tao.errors import ModelError


def contrastive_backward(
    net: nn.Module,
    loss_fn: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    precision: Precision,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    step: int = 0,
    sync: bool = True,
) -> float | torch.Tensor:
    """Accumulate into ``.grad`` the gradient of the contrastive loss over ``micro_batches`` together.

    ``net(pixels, input_ids) -> (image_emb, text_emb, logit_scale, logit_bias)`` (see
    :class:`~clip_tao.engine.distributed.ContrastiveForward`, possibly DDP/FSDP-wrapped). Returns the loss,
    checked to be finite; with ``sync=False`` the loss stays a tensor on the device, unchecked, so the host
    does not wait for the GPU every step (the caller checks it when it logs).
    """

    def backward(loss: torch.Tensor) -> None:
        if sync and not torch.isfinite(loss):
            raise ModelError(
                f"training loss became {loss.item()} at step {step}: lower train.optim.*_lr, "
                "set train.grad_clip_norm, or use precision fp32/bf16"
            )
        (scaler.scale(loss) if scaler is not None else loss).backward()

    batches = [(p.to(device, non_blocking=True), i.to(device, non_blocking=True)) for p, i in micro_batches]
    if len(batches) == 1:
        with precision.autocast(device):
            image, text, scale, bias = net(*batches[0])
            loss = loss_fn(image.float(), text.float(), scale, bias)
        backward(loss)
        return loss.item() if sync else loss.detach()

    with torch.no_grad(), precision.autocast(device):
        cached = [net(p, i)[:2] for p, i in batches]
    images = [image.float() for image, _ in cached]
    texts = [text.float() for _, text in cached]
    last = len(batches) - 1
    for j, (pixels, input_ids) in enumerate(batches):
        # Gradients are reduced across processes once, in the last pass.
        with no_gradient_sync(net) if j < last else contextlib.nullcontext():
            with precision.autocast(device):
                image, text, scale, bias = net(pixels, input_ids)
                if j < last:
                    scale, bias = scale.detach(), bias.detach()
                all_images = torch.cat(images[:j] + [image.float()] + images[j + 1 :])
                all_texts = torch.cat(texts[:j] + [text.float()] + texts[j + 1 :])
                loss = loss_fn(all_images, all_texts, scale, bias)
            backward(loss)
    return loss.item() if sync else loss.detach()

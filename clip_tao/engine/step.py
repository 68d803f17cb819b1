"""Forward and backward of one optimiser step, over one batch or several accumulated micro-batches.

Contrastive losses do not decompose over micro-batches (every pair is a negative of every other), so
accumulation follows open_clip's ``--accum-freq``: first embed every micro-batch without gradients and
cache the features, then re-run each micro-batch with gradients and compute the loss over *all* cached
features with that micro-batch's live ones in place. The sum of these backward passes is the gradient
of the loss on the whole accumulated batch. The logit scale and bias enter the loss directly, so only
the last pass lets their gradient through; the others use them detached.

A micro-batch is ``(pixels, input_ids)``, or ``(pixels, input_ids, negative_ids, info)`` with hard negatives
and duplicate ids (:mod:`clip_tao.data.pairs`): the negatives' tokens run through the text tower in the same
forward pass as the captions, and their embeddings fill the ``K`` slots of each sample (zeros where a slot
is empty; the loss masks those).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from clip_tao.engine.device import Precision
from clip_tao.engine.distributed import no_gradient_sync
from clip_tao.errors import ModelError
from clip_tao.pair_losses import PairInfo


def contrastive_backward(
    net: nn.Module,
    loss_fn: nn.Module,
    micro_batches: Sequence[tuple],
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

    batches = [_to_device(b, device) for b in micro_batches]
    infos = [b[3] for b in batches if len(b) > 3 and b[3] is not None]
    info = PairInfo.cat(infos) if len(infos) == len(batches) else None
    extras = {} if info is None else {"info": info}
    with_negatives = info is not None and info.negative_ids.shape[1] > 0
    if len(batches) == 1:
        with precision.autocast(device):
            image, text, negatives, scale, bias = _forward(net, batches[0])
            if with_negatives:
                extras["negatives"] = negatives.float()
            loss = loss_fn(image.float(), text.float(), scale, bias, **extras)
        backward(loss)
        return loss.item() if sync else loss.detach()

    with torch.no_grad(), precision.autocast(device):
        cached = [_forward(net, b)[:3] for b in batches]
    images = [image.float() for image, _, _ in cached]
    texts = [text.float() for _, text, _ in cached]
    negs = [n.float() if n is not None else None for _, _, n in cached]
    last = len(batches) - 1
    for j, batch in enumerate(batches):
        # Gradients are reduced across processes once, in the last pass.
        with no_gradient_sync(net) if j < last else contextlib.nullcontext():
            with precision.autocast(device):
                image, text, negatives, scale, bias = _forward(net, batch)
                if j < last:
                    scale, bias = scale.detach(), bias.detach()
                all_images = torch.cat(images[:j] + [image.float()] + images[j + 1 :])
                all_texts = torch.cat(texts[:j] + [text.float()] + texts[j + 1 :])
                if with_negatives:
                    extras["negatives"] = torch.cat(negs[:j] + [negatives.float()] + negs[j + 1 :])
                loss = loss_fn(all_images, all_texts, scale, bias, **extras)
            backward(loss)
    return loss.item() if sync else loss.detach()


def _to_device(batch: tuple, device: torch.device) -> tuple:
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in batch)


def _forward(net: nn.Module, batch: tuple):
    """``(image, text, negatives [B*K, D] or None, scale, bias)`` of one micro-batch."""
    pixels, input_ids = batch[:2]
    negative_ids, info = (batch[2], batch[3]) if len(batch) > 3 else (None, None)
    k = 0 if info is None else info.negative_ids.shape[1]
    if not k:
        image, text, scale, bias = net(pixels, input_ids)
        return image, text, None, scale, bias
    ids = input_ids if negative_ids is None else torch.cat([input_ids, negative_ids])
    image, text, scale, bias = net(pixels, ids)
    b = len(input_ids)
    filled = info.negative_valid.flatten()
    negatives = text.new_zeros(filled.numel(), text.shape[1])
    if negative_ids is not None:
        negatives = negatives.index_put((filled,), text[b:])
    return image, text[:b], negatives, scale, bias

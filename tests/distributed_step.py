"""Run under torchrun by tests/test_distributed.py: one training step's loss and gradients on this rank's
half of a fixed batch, for both losses, written by rank 0 for the test to compare with one process."""

from __future__ import annotations

import sys

import torch

from clip_tao.config.schema import TrainConfig
from clip_tao.engine import distributed as D
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.step import contrastive_backward
from clip_tao.losses import ContrastiveLoss
from clip_tao.models import create_model

BATCH = 8


def fixed_batch(model):
    """The same 8 (image, caption) pairs in every process."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(BATCH, 3, model.image_size, model.image_size, generator=g)
    ids = model.tokenizer([f"caption number {i} of a test batch" for i in range(BATCH)])
    return pixels, ids


def fresh_model(loss_type: str):
    model = create_model("tiny-clip", pretrained=False, loss_type=loss_type)
    if loss_type == "clip":
        model.logit_bias.requires_grad_(False)  # as the trainer does: the softmax loss has no bias
    return model


def full_gradients(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP shards gradients as DTensors
            g = g.full_tensor()
        grads[name] = g.detach().clone()
    return grads


def main(out: str, strategy: str) -> None:
    ctx = D.setup_distributed(TrainConfig(num_gpus=0))
    results = {}
    runs = [(loss, micro) for micro in ((1, 2) if strategy == "ddp" else (1,)) for loss in ("siglip", "clip")]
    for loss_type, micro in runs:
        model = fresh_model(loss_type)
        pixels, ids = fixed_batch(model)
        share = BATCH // ctx.world_size
        mine = slice(ctx.rank * share, (ctx.rank + 1) * share)
        pixels, ids = pixels[mine], ids[mine]
        net = D.wrap_for_training(model, ctx, strategy)
        loss_fn = ContrastiveLoss(loss_type, ctx.rank, ctx.world_size)
        size = share // micro
        parts = [(pixels[k : k + size], ids[k : k + size]) for k in range(0, share, size)]
        loss = contrastive_backward(net, loss_fn, parts, resolve_precision("fp32", ctx.device), ctx.device)
        D.sync_replicated_grads(net, ctx.world_size)
        results[f"{loss_type}/{micro}"] = {"loss": D.all_reduce_mean(ctx, loss), "grads": full_gradients(model)}
    if ctx.is_main:
        torch.save(results, out)
    D.barrier(ctx)  # no process leaves while another still talks to it
    D.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

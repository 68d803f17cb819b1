"""Run under torchrun by tests/test_distributed.py: like distributed_step.py, with hard negatives and
duplicate pairs (clip and siglip, duplicate_pairs ignore / positive), one and two micro-batches a rank."""

from __future__ import annotations

import os
import sys

import torch

from clip_tao.config.schema import TrainConfig
from clip_tao.data.pairs import pair_fields
from clip_tao.engine import distributed as D
from clip_tao.engine.device import resolve_precision
from clip_tao.engine.step import contrastive_backward
from clip_tao.losses import ContrastiveLoss

# Run as a script (by torchrun): the repository's own tests package, whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.distributed_step import BATCH, fixed_batch, fresh_model, full_gradients

K = 2
RUNS = [(loss, mode, micro) for loss in ("clip", "siglip") for mode in ("ignore", "positive") for micro in (1, 2)]


def pair_items() -> list[dict]:
    """8 samples with twins across the halves: 5 repeats 0's caption, 6 is 1's image, 3 has no negatives."""
    items = []
    for i in range(BATCH):
        caption = "caption number 0 of a test batch" if i == 5 else f"caption number {i} of a test batch"
        items.append({
            "caption": caption,
            "captions": (caption, f"another caption {i}") if i % 2 else (caption,),
            "image_id": 1 if i == 6 else 100 + i,
            "negatives": [] if i == 3 else [f"negative {i} a", f"negative {i} b"][: 1 + i % 2],
        })  # fmt: skip
    return items


def micro_batches(model, samples: slice, parts: int) -> list[tuple]:
    pixels, ids = fixed_batch(model)
    items = pair_items()
    rows = list(range(BATCH))[samples]
    size = len(rows) // parts
    out = []
    for p in range(parts):
        chunk = rows[p * size : (p + 1) * size]
        fields = pair_fields([items[r] for r in chunk], model.tokenizer, K)
        out.append((pixels[chunk], ids[chunk], fields["negative_ids"], fields["pair_info"]))
    return out


def step(model, loss_fn, parts, device):
    return contrastive_backward(model, loss_fn, parts, resolve_precision("fp32", device), device)


def main(out: str) -> None:
    ctx = D.setup_distributed(TrainConfig(num_gpus=0))
    results = {}
    for loss_type, mode, micro in RUNS:
        model = fresh_model(loss_type)
        share = BATCH // ctx.world_size
        parts = micro_batches(model, slice(ctx.rank * share, (ctx.rank + 1) * share), micro)
        net = D.wrap_for_training(model, ctx, "ddp")
        loss_fn = ContrastiveLoss(loss_type, ctx.rank, ctx.world_size, duplicate_pairs=mode)
        loss = step(net, loss_fn, parts, ctx.device)
        D.sync_replicated_grads(net, ctx.world_size)
        results[f"{loss_type}/{mode}/{micro}"] = {"loss": D.all_reduce_mean(ctx, loss), "grads": full_gradients(model)}
    if ctx.is_main:
        torch.save(results, out)
    D.barrier(ctx)
    D.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])

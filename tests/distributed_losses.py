"""Run under torchrun by tests/test_metadata_losses.py: the SigLIP loss of this rank's half of fixed batches for
each of TAO 7.3's ``siglip_loss_dist_impl`` values and each metadata mask mode under ``gather``, with the
gradients of this rank's features; rank 0 writes everything for the test to compare with one process."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from clip_tao.losses import siglip_loss
from clip_tao.metadata_losses import compatibility, masked_siglip_loss

# Run as a script (by torchrun): the repository's own tests package, whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.metadata_batches import MASK_CASES, random_features, worked_batch


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    image, text, raw_scale, bias = random_features()
    share = image.shape[0] // world
    mine = slice(rank * share, (rank + 1) * share)
    for impl in ("bidir", "shift", "reduce", "gather", "local"):
        img, txt = image[mine].clone().requires_grad_(True), text[mine].clone().requires_grad_(True)
        loss = siglip_loss(rank, world, impl)(img, txt, raw_scale.exp(), bias)
        loss.backward()
        results[impl] = {"loss": _gathered(loss.detach().reshape(1)), "image_grad": _gathered(img.grad),
                         "text_grad": _gathered(txt.grad)}  # fmt: skip
    batch = worked_batch()
    share = batch["image"].shape[0] // world
    mine = slice(rank * share, (rank + 1) * share)
    for mode, accessories, weight, normalization in MASK_CASES:
        # Under gather the local images meet every rank's texts: the mask is local rows against all columns,
        # built from the metadata every rank holds of its own rows (gathered without gradients).
        text_attr = torch.cat(_gathered(batch["text_attr"][mine]))
        text_acc = torch.cat(_gathered(batch["text_acc"][mine]))
        compatible = compatibility(
            text_attr, batch["image_attr"][mine], text_acc, batch["image_acc"][mine], accessories
        ).T
        img = batch["image"][mine].clone().requires_grad_(True)
        txt = batch["text"][mine].clone().requires_grad_(True)
        loss = masked_siglip_loss(
            img, txt, batch["raw_scale"], batch["bias"], compatible, mode, weight, normalization, rank, world
        )
        loss.backward()
        key = f"{mode}/{weight}/{normalization}"
        results[key] = {"loss": _gathered(loss.detach().reshape(1)), "image_grad": _gathered(img.grad),
                        "text_grad": _gathered(txt.grad)}  # fmt: skip
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

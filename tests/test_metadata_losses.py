"""TAO 7.3's losses: ``siglip_loss_dist_impl``, the metadata-masked SigLIP loss and the batch-hard triplet loss.

Expected values are a worked example computed by hand from TAO 7.3's formulas
(``masked_siglip_loss.py``, ``metadata_mask.py``, ``pl_clip_model.py``); the plain loss is open_clip's own
``SigLipLoss``; two real gloo processes must give what one process gives on the concatenated batch.
"""

from __future__ import annotations

import os

import pytest
import torch
from open_clip.loss import SigLipLoss

from clip_tao.metadata_losses import compatibility, masked_siglip_loss, triplet_loss
from tests.metadata_batches import MASK_CASES, random_features, worked_batch

HERE = os.path.dirname(__file__)

# By hand from TAO's formulas on tests/metadata_batches.py: (mode, compatible_positive_weight, normalization) -> loss
WORKED = {
    ("none", 1.0, "per_query"): 2.034072,
    ("attribute_match_ignore", 1.0, "per_query"): 1.371562,
    ("attribute_plus_accessory_match_ignore", 1.0, "per_query"): 1.691549,
    ("attribute_match_positive", 1.0, "per_pair"): 2.538976,
    ("attribute_match_positive", 0.5, "per_pair"): 1.955269,
    ("attribute_match_positive", 0.5, "per_query"): 1.733546,
    ("attribute_plus_accessory_match_positive", 1.0, "per_pair"): 2.482823,
    ("attribute_plus_accessory_match_positive", 0.5, "per_pair"): 2.087186,
    ("attribute_plus_accessory_match_positive", 0.5, "per_query"): 1.959498,
}


def _compatible(batch, accessories):
    return compatibility(batch["text_attr"], batch["image_attr"], batch["text_acc"], batch["image_acc"], accessories).T


def test_compatibility_is_the_reference_mask():
    batch = worked_batch()
    assert _compatible(batch, False).int().tolist() == [[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 1]]
    assert _compatible(batch, True).int().tolist() == [[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    with pytest.raises(ValueError, match="accessory IDs must be >= 0"):
        compatibility(batch["text_attr"], batch["image_attr"], -batch["text_acc"] - 1, batch["image_acc"], True)


@pytest.mark.parametrize(("mode", "accessories", "weight", "normalization"), MASK_CASES)
def test_masked_loss_equals_the_worked_case(mode, accessories, weight, normalization):
    batch = worked_batch()
    loss = masked_siglip_loss(
        batch["image"], batch["text"], batch["raw_scale"], batch["bias"], _compatible(batch, accessories),
        mode, weight, normalization,
    )  # fmt: skip
    assert float(loss) == pytest.approx(WORKED[(mode, weight, normalization)], abs=5e-7)


def test_none_is_open_clips_siglip_loss_and_zero_weight_adds_nothing():
    image, text, raw, bias = random_features()
    want = SigLipLoss()(image, text, raw.exp(), bias)
    assert float(masked_siglip_loss(image, text, raw, bias, None, "none")) == pytest.approx(float(want), rel=1e-12)
    batch = worked_batch()
    args = (batch["image"], batch["text"], batch["raw_scale"], batch["bias"], _compatible(batch, False))
    # Promoted pairs of weight 0 contribute nothing: the ignore mode's value.
    zero = masked_siglip_loss(*args, "attribute_match_positive", 0.0, "per_pair")
    assert float(zero) == pytest.approx(WORKED[("attribute_match_ignore", 1.0, "per_query")], abs=5e-7)


def test_triplet_loss_equals_the_worked_case():
    batch = worked_batch()
    assert float(triplet_loss(batch["image"], batch["text"], 0.2)) == pytest.approx(0.198201, abs=5e-7)
    assert float(triplet_loss(batch["image"][:1], batch["text"][:1], 0.2)) == 0.0  # one pair: no negative


def _one_process(impl_or_case, image, text, raw, bias):
    """Loss and feature gradients of the whole batch in one process."""
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    loss = impl_or_case(image, text, raw, bias)
    loss.backward()
    return float(loss.detach()), image.grad, text.grad


def test_two_processes_equal_one_process(tmp_path):
    from tests.test_distributed import torchrun

    out = tmp_path / "losses.pt"
    torchrun(os.path.join(HERE, "distributed_losses.py"), str(out))
    results = torch.load(out, weights_only=True)
    image, text, raw, bias = random_features()
    want_loss, want_image, want_text = _one_process(
        lambda i, t, r, b: SigLipLoss()(i, t, r.exp(), b), image, text, raw, bias
    )
    for impl in ("bidir", "shift", "reduce", "gather"):
        got = results[impl]
        # Each rank divides by its own batch: the ranks' mean is the whole batch's loss; the gradients (summed
        # over the ranks' losses by the exchange's backward, as DDP then averages) are the whole batch's.
        assert float(torch.cat(got["loss"]).mean()) == pytest.approx(want_loss, abs=1e-5), impl
        torch.testing.assert_close(torch.cat(got["image_grad"]) / 2, want_image, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.cat(got["text_grad"]) / 2, want_text, rtol=0, atol=1e-5)
    # local: no cross-rank negatives, each rank's loss is one process's on its own half.
    for rank, half in enumerate((slice(0, 4), slice(4, 8))):
        own = SigLipLoss()(image[half], text[half], raw.exp(), bias)
        assert float(results["local"]["loss"][rank]) == pytest.approx(float(own), abs=1e-5)
    batch = worked_batch()
    for mode, accessories, weight, normalization in MASK_CASES:
        got = results[f"{mode}/{weight}/{normalization}"]
        assert float(torch.cat(got["loss"]).mean()) == pytest.approx(WORKED[(mode, weight, normalization)], abs=1e-5)
        compatible = _compatible(batch, accessories)

        def loss_fn(i, t, r, b, compatible=compatible, mode=mode, weight=weight, normalization=normalization):
            return masked_siglip_loss(i, t, r, b, compatible, mode, weight, normalization)

        _, want_image, want_text = _one_process(
            loss_fn, batch["image"], batch["text"], batch["raw_scale"], batch["bias"]
        )
        torch.testing.assert_close(torch.cat(got["image_grad"]) / 2, want_image, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.cat(got["text_grad"]) / 2, want_text, rtol=0, atol=1e-5)


def test_triplet_term_trains_and_is_logged_under_taos_names(tiny_spec, tmp_path):
    import json

    from clip_tao.cli import main

    spec = tiny_spec("tiny-clip", num_train=16, num_val=8, train={"num_epochs": 1, "optim": {"warmup_steps": 1}})
    run = ["train", "-e", str(spec), "wandb.enable=false", "dataset.train.batch_size=8"]
    assert main([*run, "train.triplet_loss_weight=0.5", "train.triplet_margin=0.3"]) == 0
    train = tmp_path / "results" / "train"
    lines = [json.loads(line) for line in (train / "status.json").read_text().splitlines()]
    kpi = next(line["kpi"] for line in lines if line["status"] == "RUNNING")
    assert kpi["train/triplet_loss"] == kpi["triplet_loss"] > 0
    # The epoch's loss is the contrastive part plus the weighted triplet term, each a mean over the steps.
    assert kpi["train_loss"] == pytest.approx(kpi["train/contrastive_loss"] + 0.5 * kpi["train/triplet_loss"], rel=1e-5)

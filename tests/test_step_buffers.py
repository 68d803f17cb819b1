"""Shard loader workers write their shares of a step into shared step buffers: no copy, and never a batch
overwritten while something holds it."""

import pytest
import torch

from clip_tao.data import step_buffers
from clip_tao.data.loaders import build_train_loader
from clip_tao.models import create_model
from tests.shards import write_shardwriter
from tests.test_wds import _train_cfg


@pytest.fixture(scope="module")
def model():
    return create_model("tiny-clip", pretrained=False)


def _step(batches):
    """Sample key -> pixels over a step's micro-batches."""
    return {k: p for keys, pixels in batches for k, p in zip(keys, pixels)}


def _bundle(root, model, workers, batch_size=4, accumulate=1):
    cfg = _train_cfg(root, batch_size=batch_size, workers=workers, samples_per_shard=4)
    bundle = build_train_loader(cfg, model.preprocess, model.tokenizer, accumulate=accumulate)
    bundle.set_epoch(1)
    return bundle


@pytest.mark.parametrize("accumulate", [1, 2])
def test_steps_come_in_reused_shared_buffers_equal_to_one_process(tmp_path, model, accumulate):
    write_shardwriter(tmp_path / "s", 64, per_shard=4)  # 16 shards, 4 streams: 16 steps of 4, no sample twice
    want = [(b["keys"], b["pixels"].clone()) for b in _bundle(tmp_path / "s", model, 0, 4 // accumulate,
                                                               accumulate).batches()]  # fmt: skip
    got, storages, shared = [], set(), []
    bundle = _bundle(tmp_path / "s", model, 2, 4 // accumulate, accumulate)
    for batch in bundle.batches():  # as training does: one batch held at a time
        got.append((batch["keys"], batch["pixels"].clone()))
        storages.add(batch["pixels"].untyped_storage().data_ptr())
        shared.append(batch["pixels"].untyped_storage().is_shared())
    assert len(got) == len(want) == 16 * accumulate
    for step in range(16):
        # A step's samples (in the order of the workers' shares), each with the same pixels.
        mine, theirs = (_step(batches[step * accumulate : (step + 1) * accumulate]) for batches in (got, want))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # Every step's pixels sat in one of the few shared step buffers the workers wrote: none was joined by a copy
    # (a copy lives in the training process's own memory).
    assert all(shared) and len(storages) <= step_buffers.SLOTS
    assert bundle.loader.dataset.buffers is None  # dropped with the epoch's iteration


def test_batches_kept_by_the_consumer_are_never_overwritten(tmp_path, model):
    """A consumer that keeps every batch holds every buffer: the workers send their shares instead, each step is
    joined by a copy, and every batch stays what it was."""
    write_shardwriter(tmp_path / "k", 64, per_shard=4)
    want = {k: p for b in _bundle(tmp_path / "k", model, 0).batches() for k, p in zip(b["keys"], b["pixels"])}
    kept = list(_bundle(tmp_path / "k", model, 2).batches())
    assert len(kept) > 2 * step_buffers.SLOTS and sum(len(b["keys"]) for b in kept) == len(want)
    assert all(torch.equal(p, want[k]) for b in kept for k, p in zip(b["keys"], b["pixels"]))
    assert len({b["pixels"].untyped_storage().data_ptr() for b in kept}) == len(kept)
    assert not any(b["pixels"].untyped_storage().is_shared() for b in kept[step_buffers.SLOTS :])  # copies

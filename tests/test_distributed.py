"""Distributed training with two real processes (torchrun, gloo on the CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.distributed_step import fixed_batch, fresh_model, full_gradients
from tests.shards import write_shardwriter

HERE = os.path.dirname(__file__)


def torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def one_process_step(loss_type: str):
    """Reference: the whole 8-pair batch in one process, no wrapper."""
    from clip_tao.engine.device import resolve_precision
    from clip_tao.engine.distributed import ContrastiveForward
    from clip_tao.engine.step import contrastive_backward
    from clip_tao.losses import ContrastiveLoss

    model = fresh_model(loss_type)
    pixels, ids = fixed_batch(model)
    loss = contrastive_backward(
        ContrastiveForward(model), ContrastiveLoss(loss_type), [(pixels, ids)], resolve_precision("fp32", None),
        torch.device("cpu"),
    )  # fmt: skip
    return loss, full_gradients(model)


def _assert_same_gradient(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding, relative to the tensor's scale: splitting the batch over ranks or
    micro-batches changes the products' shapes and the order of the sums (measured: a few 1e-6 of the
    largest entry); a wrong split (lost negatives, a wrong scale) is off by far more."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 + 1e-4 * scale, msg=name)


@pytest.fixture(scope="module")
def reference():
    return {loss_type: one_process_step(loss_type) for loss_type in ("siglip", "clip")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_on_the_whole_batch(tmp_path, reference, strategy):
    out = tmp_path / "result.pt"
    torchrun(os.path.join(HERE, "distributed_step.py"), str(out), strategy)
    results = torch.load(out, weights_only=True)
    # DDP also with 2 accumulated micro-batches a rank (features cached across micro-batches and ranks)
    runs = ["siglip/1", "clip/1", "siglip/2", "clip/2"] if strategy == "ddp" else ["siglip/1", "clip/1"]
    assert sorted(results) == sorted(runs)
    for run in runs:
        want_loss, want_grads = reference[run.split("/")[0]]
        got = results[run]
        assert got["loss"] == pytest.approx(want_loss, rel=1e-5), run
        assert got["grads"].keys() == want_grads.keys()
        for name, grad in want_grads.items():
            _assert_same_gradient(got["grads"][name], grad, f"{run} {name}")
        assert any(g.abs().sum() > 0 for g in want_grads.values())


def test_gradient_accumulation_equals_one_big_batch(reference):
    """One process, 4 micro-batches of 2: features cached, negatives span all 8 (open_clip's --accum-freq)."""
    from clip_tao.engine.device import resolve_precision
    from clip_tao.engine.distributed import ContrastiveForward
    from clip_tao.engine.step import contrastive_backward
    from clip_tao.losses import ContrastiveLoss

    for loss_type, (want_loss, want_grads) in reference.items():
        model = fresh_model(loss_type)
        pixels, ids = fixed_batch(model)
        parts = [(pixels[k : k + 2], ids[k : k + 2]) for k in range(0, 8, 2)]
        loss = contrastive_backward(
            ContrastiveForward(model), ContrastiveLoss(loss_type), parts, resolve_precision("fp32", None),
            torch.device("cpu"),
        )  # fmt: skip
        assert loss == pytest.approx(want_loss, rel=1e-5)
        got = full_gradients(model)
        for name, grad in want_grads.items():
            _assert_same_gradient(got[name], grad, f"{loss_type} {name}")


@pytest.mark.parametrize(
    ("strategy", "loss_type", "extra"),
    [
        # a frozen tower, the clip loss's unused bias and gradient checkpointing must not trip DDP's checks
        ("ddp", "clip", {"grad_checkpointing": True}),
        ("fsdp", "siglip", {"grad_clip_norm": 1.0}),
    ],
)
def test_two_process_cli_training(tiny_spec, tmp_path, strategy, loss_type, extra):
    train = {"num_epochs": 2, "distributed_strategy": strategy, "checkpoint_interval_unit": "step",
             "checkpoint_interval": 2, "loss_type": loss_type, "sample_log": str(tmp_path / "keys"), **extra}  # fmt: skip
    spec = tiny_spec(train=train)
    data = yaml.safe_load(spec.read_text())
    data["model"]["freeze_vision_encoder"] = strategy == "ddp"
    write_shardwriter(tmp_path / "shards", 48, per_shard=6)  # 8 shards: 8 streams, 2 for each rank's worker
    data["dataset"]["train"] = {"type": "wds", "batch_size": 4, "num_workers": 2,
                                "wds": {"root_dir": str(tmp_path / "shards"), "samples_per_shard": 6}}  # fmt: skip
    spec.write_text(yaml.safe_dump(data))
    torchrun("-m", "clip_tao", "train", "-e", str(spec))
    train = tmp_path / "results" / "train"
    # FSDP: every rank writes its shard of a folder (tests/test_sharded_checkpoint.py); the plain data beside them
    suffix = ".dcp" if strategy == "fsdp" else ".pth"
    latest = _training_state(train / f"clip_latest{suffix}")
    # 48 samples / global batch 8 = 6 steps an epoch
    assert latest["world_size"] == 2 and latest["epoch"] == 2 and latest["global_step"] == 12
    assert isinstance(latest["rng"], list) and len(latest["rng"]) == 2
    lines = [json.loads(line) for line in (train / "status.json").read_text().splitlines()]
    assert [line["status"] for line in lines].count("STARTED") == 1  # only rank 0 writes
    assert lines[-1]["status"] == "SUCCESS" and "t2i_mAP" in lines[-2]["kpi"]
    mid = _training_state(train / f"model_epoch_000_step_00002{suffix}")
    assert sorted(mid["data_position"]["streams"], key=int) == [str(c) for c in range(8)]  # both ranks' streams
    ranks = [(tmp_path / "keys").read_text().split(), (tmp_path / "keys.rank1").read_text().split()]
    epoch0 = [{k for s, k in zip(r[::2], r[1::2]) if int(s) < 6} for r in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == 24 and not epoch0[0] & epoch0[1]  # disjoint halves
    if strategy == "fsdp":  # the same command with one more epoch resumes from clip_latest.dcp (sharded optimiser)
        assert not list(train.glob("*.pth")) and {p.name for p in (train / "clip_latest.dcp").iterdir()} == {
            ".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pth"}  # fmt: skip
        torchrun("-m", "clip_tao", "train", "-e", str(spec), "train.num_epochs=3")
        latest = _training_state(train / "clip_latest.dcp")
        assert latest["epoch"] == 3 and latest["global_step"] == 18


def _training_state(path):
    """A checkpoint's plain data: the .pth file, or a sharded folder's train_state.pth."""
    return torch.load(path / "train_state.pth" if path.is_dir() else path, weights_only=True)


def test_launch_decisions_without_gpus(monkeypatch, caplog):
    from clip_tao.config.schema import TrainConfig
    from clip_tao.engine.distributed import relaunch_command, setup_distributed
    from clip_tao.errors import ConfigError

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a GPU-less machine, also on a GPU CI
    ctx = setup_distributed(TrainConfig())
    assert (ctx.rank, ctx.world_size, ctx.device.type) == (0, 1, "cpu")
    with pytest.raises(ConfigError, match="start multi-node training with torchrun on every node"):
        setup_distributed(TrainConfig(num_nodes=2))
    assert relaunch_command(TrainConfig(num_gpus=1), ["train"]) is None
    assert relaunch_command(TrainConfig(num_gpus=2), ["train"]) is None  # no GPU: one process, with a warning
    assert "no GPU is visible" in caplog.text and "torchrun --standalone --nproc_per_node" in caplog.text


def test_custom_data_is_split_evenly_over_ranks():
    from clip_tao.data.loaders import EpochShuffleSampler

    shares = []
    for rank in range(3):
        sampler = EpochShuffleSampler(20, seed=4, rank=rank, world_size=3)
        sampler.set_epoch(1)
        shares.append(list(sampler))
    assert [len(s) for s in shares] == [6, 6, 6]  # 20 // 3 each: equal steps on every rank
    assert len(set().union(*map(set, shares))) == 18  # disjoint
    sampler = EpochShuffleSampler(20, seed=4, rank=1, world_size=3)
    sampler.set_epoch(1)
    sampler.start_index = 4
    assert list(sampler) == shares[1][4:]  # resuming a rank mid-epoch


def test_hard_negatives_and_duplicates_on_two_ranks_equal_one_rank(tmp_path):
    """Twins split across the ranks and hard negatives: the gathered loss is the whole batch's loss."""
    from clip_tao.engine.distributed import ContrastiveForward
    from clip_tao.losses import ContrastiveLoss
    from tests.distributed_pairs_step import RUNS, micro_batches, step

    out = tmp_path / "pairs.pt"
    torchrun(os.path.join(HERE, "distributed_pairs_step.py"), str(out))
    results = torch.load(out, weights_only=True)
    for loss_type, mode, micro in RUNS:
        model = fresh_model(loss_type)
        loss_fn = ContrastiveLoss(loss_type, duplicate_pairs=mode)
        want_loss = step(ContrastiveForward(model), loss_fn, micro_batches(model, slice(None), 1), torch.device("cpu"))
        want = full_gradients(model)
        got = results[f"{loss_type}/{mode}/{micro}"]
        assert abs(got["loss"] - want_loss) < 1e-5, (loss_type, mode, micro)
        for name, grad in want.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-5, msg=f"{loss_type} {mode} {name}")
        # the twins matter: the plain loss on the same batch differs
        plain = step(ContrastiveForward(fresh_model(loss_type)), ContrastiveLoss(loss_type),
                     [p[:2] for p in micro_batches(model, slice(None), 1)], torch.device("cpu"))  # fmt: skip
        assert abs(plain - want_loss) > 1e-4

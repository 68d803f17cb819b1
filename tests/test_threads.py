"""CPU threads of the main process and of the loader workers."""

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from clip_tao.errors import ConfigError
from clip_tao.threads import allowed_cpus, main_process_threads, one_thread_per_worker, set_main_process_threads


def test_main_process_threads_follow_the_spec_then_the_environment_then_the_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpus = allowed_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    assert main_process_threads(None, 0) == cpus
    assert main_process_threads(None, 1) == max(1, cpus - 1)  # a loader worker takes a CPU
    assert main_process_threads(None, cpus + 5) == 1  # never fewer than one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 2))  # ranks of this node share the CPUs
    assert main_process_threads(None, 0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert main_process_threads(None, 2) == 3  # the standard variable overrides the automatic choice
    assert main_process_threads(5, 2) == 5  # and train.num_threads overrides both
    with pytest.raises(ConfigError, match="train.num_threads=0"):
        main_process_threads(0, 0)


def test_set_main_process_threads_applies_to_torch(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert set_main_process_threads(1, 0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class _ThreadReport(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.tensor([torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "0"))])


def test_loader_workers_run_one_thread_each(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what the worker inherits; it must go down to one
    loader = DataLoader(_ThreadReport(), batch_size=1, num_workers=1, worker_init_fn=one_thread_per_worker)
    for batch in loader:
        assert batch.tolist() == [[1, 1]]


def test_training_and_validation_each_count_their_own_loader_workers(tiny_spec, monkeypatch):
    """One-process training beside validation workers: the training steps get every CPU (no worker runs
    beside them), validation the CPUs less its workers, and the count from before comes back after it."""
    from clip_tao.cli import main
    from clip_tao.engine import trainer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    seen = {"train": set(), "validate": set()}
    real_backward, real_embed = trainer.contrastive_backward, trainer.embed_loader

    def backward(*args, **kwargs):
        seen["train"].add(torch.get_num_threads())
        return real_backward(*args, **kwargs)

    def embed(*args, **kwargs):
        seen["validate"].add(torch.get_num_threads())
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(trainer, "contrastive_backward", backward)
    monkeypatch.setattr(trainer, "embed_loader", embed)
    spec = tiny_spec(train={"num_epochs": 2, "validation_interval": 1, "precision": "fp32"})
    before = torch.get_num_threads()
    try:
        assert main(["train", "-e", str(spec), "dataset.train.num_workers=0", "dataset.val.num_workers=1"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen["train"] == {main_process_threads(None, 0)}
    assert seen["validate"] == {main_process_threads(None, 1)}


def test_threads_during_a_phase_come_back_after_it(monkeypatch):
    from clip_tao.threads import main_process_threads_during

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with main_process_threads_during(1, 3) as threads:
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), main_process_threads_during(1, 0):
        raise RuntimeError("validation failed")
    assert torch.get_num_threads() == before

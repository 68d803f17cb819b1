"""TAO 7.3's unique-caption batches (``balance_query_types`` with ``unique_caption_per_batch``, its default):
the batches equal those TAO's own sampler wrote for the same rows (tests/data/tao_7.3/unique_caption_batches.json),
training trains exactly them, and a run killed mid-epoch resumes on the same batches."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from clip_tao.data.samplers import UniqueCaptionBatchSampler
from tests.conftest import REPO, make_dataset
from tests.processes import kill_tree

TAO = json.loads((REPO / "tests" / "data" / "tao_7.3" / "unique_caption_batches.json").read_text())


@pytest.mark.parametrize("world", [1, 2])
def test_the_batches_are_taos(world):
    kinds, captions = TAO["query_types"], TAO["captions"]
    for rank in range(world):
        sampler = UniqueCaptionBatchSampler(kinds, captions, TAO["batch_size"], TAO["seed"], rank, world)
        for epoch in (0, 1, 2):
            want = TAO["batches"][f"world{world}_rank{rank}_epoch{epoch}"]
            sampler.set_epoch(epoch)
            assert sampler.batches_per_rank == want["len"]
            flat = list(sampler)
            got = [flat[i : i + TAO["batch_size"]] for i in range(0, len(flat), TAO["batch_size"])]
            assert got == want["batches"], (rank, epoch)
            for batch in got:  # what the batches are for: no caption twice, each type its quota
                assert len({captions[i] for i in batch}) == len(batch)
                assert Counter(kinds[i] for i in batch) == {"easy": 2, "medium": 2, "hard": 2}
        sampler.set_epoch(0)
        sampler.start_index = 7  # resuming after 7 samples of the epoch continues the same batches
        assert list(sampler) == [i for b in TAO["batches"][f"world{world}_rank{rank}_epoch0"]["batches"] for i in b][7:]


def test_a_batch_smaller_than_the_query_types_is_refused_by_the_sampler():
    with pytest.raises(ValueError, match="smaller than the 3 query types"):
        UniqueCaptionBatchSampler(["easy", "medium", "hard"], ["a", "b", "c"], 2, seed=0)


def _tao_dataset(root):
    """The fixture's rows as a dataset in TAO's layout: one image a row, its caption file, list and pairs file."""
    names = [f"img_{i:03d}.jpg" for i in range(len(TAO["captions"]))]
    make_dataset(root / "images", len(names), seed=3, size=32, caption_dir=root / "captions")
    rows = []
    for name, kind, caption in zip(names, TAO["query_types"], TAO["captions"]):
        (root / "captions" / name.replace(".jpg", ".txt")).write_text(caption + "\n")
        rows.append({"dataset": "TOY", "query_type": kind, "caption": caption, "image_path": f"images/TOY/{name}"})
    (root / "train_list.txt").write_text("\n".join(names) + "\n")
    (root / "train_pairs.json").write_text(json.dumps(rows))
    return {"image_dir": str(root / "images"), "caption_dir": str(root / "captions"),
            "image_list_file": str(root / "train_list.txt"), "train_pairs_file": str(root / "train_pairs.json")}, names  # fmt: skip


def _trained(log) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for line in log.read_text().splitlines():
        step, key = line.split(" ", 1)
        steps.setdefault(int(step), []).append(key.strip())
    return steps


def test_training_trains_taos_batches_and_a_killed_run_resumes_on_them(tiny_spec, tmp_path):
    entry, names = _tao_dataset(tmp_path / "pas")
    spec = tiny_spec("tiny-clip", dataset={"train": {"batch_size": TAO["batch_size"], "num_workers": 0,
                                                     "datasets": [entry], "balance_query_types": True}},
                     train={"num_epochs": 3, "checkpoint_interval_unit": "step", "checkpoint_interval": 1,
                            "num_threads": 1})  # fmt: skip

    def command(results, log):
        return [sys.executable, "-m", "clip_tao", "train", "-e", str(spec), f"results_dir={results}",
                f"train.sample_log={log}", "wandb.enable=false"]  # fmt: skip

    whole = subprocess.run(command(tmp_path / "whole", tmp_path / "whole.keys"), capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "unique_caption_per_batch: 4 batches a process an epoch" in whole.stderr
    want = [batch for epoch in (0, 1, 2) for batch in TAO["batches"][f"world1_rank0_epoch{epoch}"]["batches"]]
    trained = _trained(tmp_path / "whole.keys")
    assert [sorted(trained[step]) for step in sorted(trained)] == [sorted(f"0/{names[i]}" for i in b) for b in want]
    # Killed in epoch 1 (steps 4-6), then the same command: the same batches, none twice, none left out.
    results, log = tmp_path / "killed", tmp_path / "killed.keys"
    process = subprocess.Popen(command(results, log), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not list((results / "train").glob("model_epoch_001_step_00005.pth")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint at step 5"
            time.sleep(0.02)
    finally:
        kill_tree(process.pid)
        process.wait()
    again = subprocess.run(command(results, log), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "not the exact continuation" not in again.stderr
    assert _trained(log) == trained

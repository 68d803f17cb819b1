"""FSDP checkpoints written per rank with ``torch.distributed.checkpoint`` (real processes: torchrun, gloo on the
CPU): every rank writes its own shard; a killed run continues from the folder on another process count or
strategy; evaluate, inference and export read the folder; a damaged folder is one clear error.

Expected weights come from PyTorch's own consolidation (``format_utils.dcp_to_torch_save``), not our reader.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch
import yaml

from clip_tao.cli import main
from tests.conftest import make_dataset, write_spec
from tests.processes import kill_tree
from tests.test_resume_layouts import _steps

GLOBAL_BATCH = 8  # 48 samples: 6 steps an epoch, 12 in all


def _spec(root: Path) -> Path:
    train = make_dataset(root / "data" / "train", 48, seed=1)
    val = make_dataset(root / "data" / "val", 16, seed=2)
    return write_spec(root / "spec.yaml", {
        "results_dir": str(root / "results"),
        "model": {"type": "tiny-clip"},
        "dataset": {"train": {"batch_size": GLOBAL_BATCH, "num_workers": 0, "datasets": [{"image_dir": str(train)}]},
                    "val": {"batch_size": 16, "num_workers": 0, "datasets": [{"image_dir": str(val)}]}},
        "train": {"num_epochs": 2, "precision": "fp32", "optim": {"warmup_steps": 2}, "num_threads": 1,
                  "checkpoint_interval_unit": "step", "checkpoint_interval": 1},
        "evaluate": {"num_workers": 0, "batch_size": 8},
        "inference": {"num_workers": 0, "batch_size": 8},
    })  # fmt: skip


def _command(spec: Path, results: Path, log: Path, processes: int, strategy: str) -> list[str]:
    args = ["-m", "clip_tao", "train", "-e", str(spec), f"results_dir={results}", f"train.sample_log={log}",
            f"dataset.train.batch_size={GLOBAL_BATCH // processes}", f"train.distributed_strategy={strategy}"]  # fmt: skip
    if processes == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(command: list[str]) -> None:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _upstream_model(folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The whole model as PyTorch's own converter writes it (clip-tao names: the wrapper's ``model.`` removed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch)
    saved = torch.load(scratch, weights_only=True)
    return {name.removeprefix("model."): t for name, t in saved["model"].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two uninterrupted runs of the same spec at the same global batch: FSDP on 2 processes, and 1 process."""
    root = tmp_path_factory.mktemp("sharded")
    spec = _spec(root)
    _train(_command(spec, root / "fsdp", root / "fsdp.keys", 2, "fsdp"))
    _train(_command(spec, root / "single", root / "single.keys", 1, "ddp"))
    return SimpleNamespace(root=root, spec=spec, fsdp=root / "fsdp" / "train", single=root / "single" / "train")


def test_every_rank_writes_its_own_shard(runs, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from clip_tao.engine.checkpoint import load_checkpoint

    train = runs.fsdp
    assert not list(train.glob("*.pth"))  # no single-file checkpoint under FSDP
    folders = sorted(train.glob("model_epoch_*_step_*.dcp"))
    assert len(folders) == 12 and folders[-1].name == "model_epoch_001_step_00012.dcp"
    assert (train / "clip_latest.dcp").resolve() == folders[-1].resolve()
    assert not list(train.glob(".*.tmp"))
    folder = folders[-1]
    assert {p.name for p in folder.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pth"}
    state = torch.load(folder / "train_state.pth", weights_only=True)  # plain data, no weights
    assert state["global_step"] == 12 and state["epoch"] == 2 and state["world_size"] == 2
    assert len(state["rng"]) == 2 and "model" not in state and state["optimizer_param_groups"]
    # Step 12 is saved as a step checkpoint, then again as the last epoch's: its plain data records the end.
    assert state["steps_in_epoch"] == 0 and len(state["history"]) == 2

    # Which bytes of the model each file holds, from DCP's own index: about half each, never the whole model.
    full = _upstream_model(folder, tmp_path / "full.pt")
    whole = sum(t.numel() * t.element_size() for t in full.values())
    model_bytes: dict[str, int] = defaultdict(int)
    for index, info in FileSystemReader(str(folder)).read_metadata().storage_data.items():
        if index.fqn.startswith("model."):
            model_bytes[info.relative_path] += info.length
    assert sorted(model_bytes) == ["__0_0.distcp", "__1_0.distcp"]
    for name, size in model_bytes.items():
        assert 0.3 * whole < size < 0.7 * whole, (name, size, whole)

    # clip-tao's reader (one process, no process group) gives PyTorch's consolidated model, bit for bit.
    ours = load_checkpoint(str(folder))
    assert ours["model_type"] == "tiny-clip" and ours["global_step"] == 12
    assert ours["model"].keys() == full.keys()
    for name, tensor in full.items():
        assert torch.equal(ours["model"][name], tensor), name


def test_evaluate_inference_and_export_read_the_folder(runs, tmp_path):
    from clip_tao.deploy.ort_backend import OnnxRuntimeEncoder
    from clip_tao.models import create_model

    folder = runs.fsdp / "clip_latest.dcp"
    consolidated = tmp_path / "consolidated.pth"  # PyTorch's consolidation of the same folder, as a state dict
    torch.save(_upstream_model(folder, tmp_path / "full.pt"), consolidated)
    val = runs.root / "data" / "val"
    figures, embeddings = {}, {}
    for name, checkpoint in (("folder", folder), ("file", consolidated)):
        out = tmp_path / name
        assert main(["evaluate", "-e", str(runs.spec), f"results_dir={out}", f"evaluate.checkpoint={checkpoint}"]) == 0
        results = json.loads((out / "evaluate" / "results.json").read_text())
        figures[name] = {k: v for k, v in results.items() if k.startswith(("i2t_", "t2i_"))}
        overrides = [
            f"results_dir={out}",
            f"inference.checkpoint={checkpoint}",
            f"inference.datasets=[{{image_dir: {val}}}]",
        ]
        assert main(["inference", "-e", str(runs.spec), *overrides]) == 0
        with h5py.File(out / "inference" / "image_embeddings.h5") as f:
            embeddings[name] = f["embeddings"][()]
    assert figures["folder"] == figures["file"] and "t2i_mAP" in figures["file"]
    assert embeddings["folder"].shape[0] == 16 and (embeddings["folder"] == embeddings["file"]).all()

    onnx_file = tmp_path / "export" / "clip.onnx"
    assert main(["export", "-e", str(runs.spec), f"results_dir={tmp_path}", f"export.checkpoint={folder}",
                 f"export.onnx_file={onnx_file}"]) == 0  # fmt: skip
    model = create_model("tiny-clip", pretrained=False)
    model.load_state_dict(torch.load(consolidated, weights_only=True))
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(OnnxRuntimeEncoder(str(onnx_file)).encode_image(pixels),
                                   model.eval().encode_image(pixels), atol=1e-5, rtol=0)  # fmt: skip


def test_a_damaged_folder_is_one_clear_error(runs, tmp_path, capsys):
    from clip_tao.engine.checkpoint import load_checkpoint
    from clip_tao.errors import ModelError

    source = runs.fsdp / "model_epoch_000_step_00003.dcp"
    missing = tmp_path / "missing.dcp"
    shutil.copytree(source, missing)
    (missing / "__1_0.distcp").unlink()
    with pytest.raises(ModelError, match=r"is incomplete: shard __1_0.distcp is missing") as error:
        load_checkpoint(str(missing))
    assert str(missing) in str(error.value) and "\n" not in str(error.value)

    truncated = tmp_path / "truncated.dcp"
    shutil.copytree(source, truncated)
    with open(truncated / "__0_0.distcp", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "__0_0.distcp") // 2)
    assert main(["evaluate", "-e", str(runs.spec), f"results_dir={tmp_path}", f"evaluate.checkpoint={truncated}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(truncated) in err[0] and "shard __0_0.distcp is truncated" in err[0], err

    no_index = tmp_path / "no_index.dcp"
    shutil.copytree(source, no_index)
    (no_index / ".metadata").unlink()
    with pytest.raises(ModelError, match=r"a folder without \.metadata"):
        load_checkpoint(str(no_index))

    # DCP's index is a pickle: one that would run a command is refused before anything in it is called.
    crafted, marker = tmp_path / "crafted.dcp", tmp_path / "ran"
    shutil.copytree(source, crafted)

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (crafted / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelError, match=r"\.metadata cannot be read: .*system has no place in a checkpoint index"):
        load_checkpoint(str(crafted))
    assert not marker.exists()

    # Resuming from the folder with a missing shard stops before any step is trained, with the same line.
    command = _command(runs.spec, tmp_path / "resumed", tmp_path / "resumed.keys", 1, "ddp")
    done = subprocess.run([*command, f"train.resume_training_checkpoint_path={missing}"], env=_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 1 and "shard __1_0.distcp is missing" in done.stderr, done.stderr[-2000:]


def _kill_at_a_random_step(command: list[str], train: Path, suffix: str = ".dcp") -> int:
    """Start ``command``; SIGKILL every process of it once the checkpoint of a random step exists."""
    stop = random.randint(2, 10)  # of the run's 12 steps
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not list(train.glob(f"model_epoch_*_step_{stop:05d}{suffix}")):  # renamed into place when complete
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint in 600 s"
            time.sleep(0.02)
        kill_tree(process.pid)  # every process at once, as a preempted node loses them
    finally:
        process.wait()
    return stop


def _final_weights(train: Path) -> tuple[dict, dict]:
    from clip_tao.engine.checkpoint import load_checkpoint
    from clip_tao.engine.trainer import latest_checkpoint

    checkpoint = load_checkpoint(latest_checkpoint(str(train)))
    return checkpoint["model"], checkpoint


def test_a_killed_fsdp_run_continues_on_another_layout(runs, tmp_path):
    """FSDP on 2 processes, SIGKILLed at a random step; the same command continues from clip_latest.dcp with
    FSDP on 2 processes (the uninterrupted FSDP run, exactly), in 1 process and with DDP on 2 processes (the
    uninterrupted 1-process run, to float32 rounding: the layout tests' tolerance)."""
    interrupted, log = tmp_path / "interrupted", tmp_path / "interrupted.keys"
    stop = _kill_at_a_random_step(_command(runs.spec, interrupted, log, 2, "fsdp"), interrupted / "train")
    want_single, want_fsdp = _steps(runs.root / "single.keys"), _steps(runs.root / "fsdp.keys")
    assert want_single == want_fsdp and len(want_single) == 12
    for processes, strategy in ((2, "fsdp"), (1, "ddp"), (2, "ddp")):
        name = f"{processes}_{strategy}"
        results, resumed_log = tmp_path / name, tmp_path / f"{name}.keys"
        shutil.copytree(interrupted, results, symlinks=True)  # clip_latest.dcp stays a link into the copy
        for part in tmp_path.glob("interrupted.keys*"):
            shutil.copyfile(part, tmp_path / part.name.replace("interrupted", name))
        _train(_command(runs.spec, results, resumed_log, processes, strategy))
        assert _steps(resumed_log) == want_single, f"{name}, killed after step {stop}"
        got, checkpoint = _final_weights(results / "train")
        assert checkpoint["global_step"] == 12 and checkpoint["world_size"] == processes
        if strategy == "fsdp":
            want, _ = _final_weights(runs.fsdp)
            for key, value in want.items():
                assert torch.equal(got[key], value), f"{key}: {name}, killed after step {stop}"
            continue
        _assert_close_to(_final_weights(runs.single)[0], got, f"{name}, killed after step {stop}")


def _assert_close_to(want: dict, got: dict, what: str) -> None:
    """The layout tests' tolerance: float32 rounding of another sum order (tests/test_resume_layouts.py)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        mine = got[key]
        if key.endswith("attn.in_proj_bias"):  # the key bias: rounding noise only (see test_resume_layouts)
            d = len(value) // 3
            value, mine = torch.cat([value[:d], value[2 * d :]]), torch.cat([mine[:d], mine[2 * d :]])
        torch.testing.assert_close(mine, value, rtol=0, atol=1e-5, msg=f"{key}: {what}")


def test_a_killed_one_process_run_continues_under_fsdp(runs, tmp_path):
    """The other direction: one process writes TAO's .pth, SIGKILLed at a random step; FSDP on 2 processes
    continues from it (the optimiser's state keyed by position is matched to the sharded parameters by name)."""
    results, log = tmp_path / "results", tmp_path / "keys"
    stop = _kill_at_a_random_step(_command(runs.spec, results, log, 1, "ddp"), results / "train", ".pth")
    _train(_command(runs.spec, results, log, 2, "fsdp"))
    assert _steps(log) == _steps(runs.root / "single.keys"), f"killed after step {stop}"
    got, checkpoint = _final_weights(results / "train")
    assert checkpoint["global_step"] == 12 and checkpoint["world_size"] == 2
    assert (results / "train" / "clip_latest.dcp").is_symlink()  # the newer of clip_latest.pth and .dcp
    _assert_close_to(_final_weights(runs.single)[0], got, f"killed after step {stop}")


def test_top_k_folders_and_replace_periodic_under_fsdp(tmp_path):
    """train.checkpointer with replace_periodic: the best epochs as .dcp folders, one periodic folder kept, also
    across a resumption (the folder that clip_latest.dcp named is the one replaced)."""
    spec = _spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    data["train"].update(checkpoint_interval_unit="epoch", checkpointer={
        "enable_topk": True, "replace_periodic": True, "monitor": "train_loss", "filename": "best_{epoch:03d}"})  # fmt: skip
    spec.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    command = _command(spec, results, tmp_path / "keys", 2, "fsdp")
    _train([*command, "train.num_epochs=1"])
    train = results / "train"
    assert sorted(p.name for p in train.glob("*.dcp")) == [
        "best_000.dcp", "clip_best.dcp", "clip_latest.dcp", "model_epoch_000_step_00006.dcp"]  # fmt: skip
    _train([*command, "train.num_epochs=2"])  # resumes from clip_latest.dcp
    periodic = sorted(p.name for p in train.glob("model_epoch_*"))
    assert periodic == ["model_epoch_001_step_00012.dcp"] and not list(train.glob("*.pth"))
    assert (train / "clip_latest.dcp").resolve() == (train / periodic[0]).resolve()
    best = sorted(p.name for p in train.glob("best_*"))
    assert len(best) == 1 and {p.name for p in (train / best[0]).iterdir()} >= {".metadata", "__1_0.distcp"}
    from clip_tao.engine.checkpoint import load_checkpoint

    assert load_checkpoint(str(train / best[0]))["model"]  # a complete folder, readable on its own


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    """Every rank checks its own pieces before the collective write; a NaN stops the save with one line and
    leaves no folder (here one process: the check is the same on each rank's local shards)."""
    from clip_tao.config.schema import OptimConfig
    from clip_tao.engine.distributed import ContrastiveForward, DistContext
    from clip_tao.engine.optim import build_optimizer
    from clip_tao.engine.sharded_checkpoint import save_sharded
    from clip_tao.errors import TrainingError
    from clip_tao.models import create_model

    model = create_model("tiny-clip", pretrained=False)
    with torch.no_grad():
        next(model.vision_parameters())[0].fill_(float("nan"))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    path = tmp_path / "model_epoch_000_step_00004.dcp"
    last = str(tmp_path / "model_epoch_000_step_00002.dcp")
    with pytest.raises(TrainingError, match=r"training diverged at step 4: 1 weight tensors hold NaN/inf .*step_00002"):
        save_sharded(str(path), ContrastiveForward(model), build_optimizer(model, OptimConfig()), {}, ctx, 4, last)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_write_leaves_only_temporary_names_that_the_next_run_removes(tmp_path):
    """A kill during a sharded save leaves its folder under the temporary name (and perhaps the link's); the
    next run's claim of the folder removes them and nothing else."""
    from clip_tao.io.atomic import clean_stale_temp_files, link_latest

    done = tmp_path / "model_epoch_000_step_00002.dcp"
    done.mkdir()
    (done / "__0_0.distcp").write_bytes(b"x")
    link_latest(str(done), str(tmp_path / "clip_latest.dcp"))
    partial = tmp_path / ".model_epoch_000_step_00003.dcp.tmp"
    partial.mkdir()
    (partial / "__1_0.distcp").write_bytes(b"half")
    os.symlink(partial.name, tmp_path / ".clip_latest.dcp.link.tmp")
    assert sorted(clean_stale_temp_files(str(tmp_path))) == [".clip_latest.dcp.link.tmp", partial.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_latest.dcp", done.name]
    assert (tmp_path / "clip_latest.dcp").resolve() == done.resolve() and (done / "__0_0.distcp").exists()

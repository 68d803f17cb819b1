"""Inference and evaluation at collection scale: several real processes (torchrun, gloo) against one,
parts written as computed and read back by clip-retrieval's own reader, a SIGKILLed run resumed, and
WebDataset shards from a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from clip_tao.cli import main
from tests.conftest import make_dataset
from tests.processes import kill_tree
from tests.shards import square, write_shardwriter
from tests.test_s3 import s3_server  # noqa: F401  (the moto server fixture)


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "clip_tao", *args]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def read_h5(path: Path) -> tuple[np.ndarray, list[str], dict]:
    with h5py.File(path, "r") as f:
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["image_paths"][()]]
        return f["embeddings"][()], paths, dict(f.attrs)


def last_status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text().splitlines()[-1])


def image_folder(root: Path) -> Path:
    """37 images, a twin, an undecodable file and a hostile name; no captions needed for inference."""
    folder = make_dataset(root, 37, seed=5)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    shutil.copy(folder / "img_003.jpg", folder / "img_003 twin.jpg")
    (folder / "img_bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    shutil.copy(folder / "img_010.jpg", folder / "ünï cødé ☃ '\";.jpg")
    return folder


def test_two_processes_write_what_one_process_writes(tiny_spec, tmp_path):
    folder = image_folder(tmp_path / "collection")
    spec = tiny_spec(inference={"datasets": [{"image_dir": str(folder)}], "batch_size": 4, "num_workers": 1,
                                "part_size": 6})  # fmt: skip
    assert main(["inference", "-e", str(spec), f"results_dir={tmp_path / 'one'}"]) == 0
    torchrun("inference", "-e", str(spec), f"results_dir={tmp_path / 'two'}", "inference.output_format=npy")

    one, two = tmp_path / "one" / "inference", tmp_path / "two" / "inference"
    want, want_paths, want_attrs = read_h5(one / "image_embeddings.h5")
    got, got_paths, got_attrs = read_h5(two / "image_embeddings.h5")
    assert len(want_paths) == 39 and got_paths == want_paths  # 37 + twin + hostile name; the bad file skipped
    assert got_attrs == want_attrs and want_attrs["num_images"] == 39 and want_attrs["embedding_type"] == "image"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    twin = want_paths.index(str(folder / "img_003 twin.jpg"))
    np.testing.assert_allclose(want[twin], want[want_paths.index(str(folder / "img_003.jpg"))], atol=1e-6)
    for status in (last_status(one), last_status(two)):
        assert status["status"] == "SUCCESS" and status["kpi"]["num_images"] == 39
    assert last_status(two)["kpi"]["num_processes"] == 2

    # each process embedded its own share: 40 files in parts of 6 -> 7 parts, dealt out round robin
    markers = sorted((two / "parts").glob("part_*.json"))
    writers = [json.loads(m.read_text())["process"] for m in markers]
    assert len(markers) == 7 and writers == [0, 1, 0, 1, 0, 1, 0]
    skipped = sum(json.loads(m.read_text())["skipped"].get("undecodable_image", 0) for m in markers)
    assert skipped == 1

    # clip-retrieval's layout, read by the reader clip-retrieval and autofaiss use
    from embedding_reader import EmbeddingReader

    assert sorted(p.name for p in (two / "img_emb").iterdir())[:2] == ["img_emb_0.npy", "img_emb_1.npy"]
    reader = EmbeddingReader(embeddings_folder=str(two / "img_emb"), metadata_folder=str(two / "metadata"),
                             meta_columns=["image_path"], file_format="parquet_npy")  # fmt: skip
    assert reader.count == 39 and reader.dimension == want.shape[1]
    blocks = list(reader(batch_size=1000, start=0, end=reader.count, show_progress=False))
    embeddings = np.concatenate([b[0] for b in blocks])
    paths = [p for b in blocks for p in b[1]["image_path"]]
    assert paths == want_paths
    np.testing.assert_allclose(embeddings, want, rtol=0, atol=1e-5)
    # and by numpy alone, as autofaiss reads an embeddings folder
    assert np.load(two / "img_emb" / "img_emb_0.npy").dtype == np.float32


def write_eval_shards(folder: Path) -> Path:
    """Captioned shards (webdataset.ShardWriter) and one with a bad image and an image without a caption."""
    import webdataset

    write_shardwriter(folder, 26, per_shard=4)  # 7 shards
    image, caption = square(99)
    with webdataset.TarWriter(str(folder / "shard-999999.tar")) as sink:
        sink.write({"__key__": "bad", "jpg": b"not an image", "txt": "broken"})
        sink.write({"__key__": "no-caption", "jpg": image})
        sink.write({"__key__": "good", "jpg": image, "txt": caption})
    return folder


def test_two_process_evaluate_on_shards_equals_one_process(tiny_spec, tmp_path):
    shards = write_eval_shards(tmp_path / "shards")
    spec = tiny_spec(evaluate={"wds": {"root_dir": str(shards), "samples_per_shard": 4}, "batch_size": 3,
                               "num_workers": 1})  # fmt: skip
    assert main(["evaluate", "-e", str(spec), f"results_dir={tmp_path / 'one'}"]) == 0
    torchrun("evaluate", "-e", str(spec), f"results_dir={tmp_path / 'two'}")
    want = json.loads((tmp_path / "one" / "evaluate" / "results.json").read_text())
    got = json.loads((tmp_path / "two" / "evaluate" / "results.json").read_text())
    assert want["num_images"] == 27 and want["num_texts"] == 27
    assert want["skipped_files"] == {"undecodable_image": 1, "missing_caption": 1}
    assert got["skipped_files"] == want["skipped_files"] and got["num_processes"] == 2
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-6), key
        elif key != "num_processes":
            assert got[key] == value, key


def test_multi_caption_evaluate_on_two_processes(tiny_spec, tmp_path):
    images = make_dataset(tmp_path / "mc", 21, seed=8)
    for i, caption in enumerate(sorted(images.glob("*.txt"))):
        caption.write_text(caption.read_text() + "".join(f"caption {j} of image {i}\n" for j in range(i % 3)))
    spec = tiny_spec(evaluate={"datasets": [{"image_dir": str(images), "multi_caption": True}], "batch_size": 4})
    assert main(["evaluate", "-e", str(spec), f"results_dir={tmp_path / 'one'}"]) == 0
    torchrun("evaluate", "-e", str(spec), f"results_dir={tmp_path / 'two'}")
    want = json.loads((tmp_path / "one" / "evaluate" / "results.json").read_text())
    got = json.loads((tmp_path / "two" / "evaluate" / "results.json").read_text())
    assert want["num_images"] == 21 and want["num_texts"] == 21 + 21  # 0, 1 or 2 more captions an image
    for key in ("i2t_R@1", "t2i_R@5", "i2t_mAP", "t2i_mAP", "t2i_MeanR", "i2t_AUC", "num_texts"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def upload_shards(server: dict, folder: Path, prefix: str) -> list[str]:
    import boto3

    endpoint = server["query"].split("endpoint=")[1].split("&")[0]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in sorted(folder.glob("*.tar")):
        client.upload_file(str(path), "clip-data", f"{prefix}/{path.name}")
    return sorted(p.name for p in folder.glob("*.tar"))


def test_killed_two_process_run_on_s3_resumes_to_the_uninterrupted_result(tiny_spec, tmp_path, s3_server):  # noqa: F811
    import webdataset

    folder = tmp_path / "shards"
    write_shardwriter(folder, 60, per_shard=3)  # 20 shards
    with webdataset.TarWriter(str(folder / "shard-000999.tar")) as sink:  # no caption is fine; a bad image is not
        sink.write({"__key__": "image-only", "jpg": square(7)[0]})
        sink.write({"__key__": "bad", "jpg": b"\x00" * 10})
    names = upload_shards(s3_server, folder, "embed")
    listing = tmp_path / "shards.txt"
    query = s3_server["query"]
    listing.write_text(
        "".join(f"s3://clip-data/embed/{n}?{query}\n" for n in names) + f"s3://clip-data/embed/gone.tar?{query}\n"
    )
    spec = tiny_spec(inference={"wds": {"shard_list_file": str(listing), "samples_per_shard": 3}, "batch_size": 1,
                                "num_workers": 0, "output_format": "npy"})  # fmt: skip
    assert main(["inference", "-e", str(spec), f"results_dir={tmp_path / 'whole'}"]) == 0
    want, want_keys, _ = read_h5(tmp_path / "whole" / "inference" / "image_embeddings.h5")
    assert len(want_keys) == 61 and want_keys[0] == "s3://clip-data/embed/shard-000000.tar/000000"
    assert want_keys[-1] == "s3://clip-data/embed/shard-000999.tar/image-only"
    assert not any("127.0.0.1" in k for k in want_keys)  # no endpoint or query string in the keys

    out = tmp_path / "killed" / "inference"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clip_tao",
               "inference", "-e", str(spec), f"results_dir={tmp_path / 'killed'}"]  # fmt: skip
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().randint(1, 15)  # parts finished before the kill: a random moment mid-run
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and job.poll() is None:
        if len(list((out / "parts").glob("part_*.json"))) >= kill_after:
            break
        time.sleep(0.005)
    kill_tree(job.pid)
    job.wait(timeout=60)
    time.sleep(2)  # nothing of the killed job may still be writing
    done_at_kill = len(list((out / "parts").glob("part_*.json")))
    assert 1 <= done_at_kill < 22 and not (out / "image_embeddings.h5").exists(), "the run was not interrupted"

    torchrun("inference", "-e", str(spec), f"results_dir={tmp_path / 'killed'}")
    got, got_keys, _ = read_h5(out / "image_embeddings.h5")
    assert got_keys == want_keys  # every item exactly once, in the uninterrupted order
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    kpi = last_status(out)["kpi"]
    assert kpi["resumed_parts"] == done_at_kill and kpi["num_parts"] == 22  # 21 shards + the missing one
    markers = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("part_*.json"))]
    skipped = {}
    for marker in markers:
        for reason, n in marker["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"undecodable_image": 1, "unreadable_shard": 1}
    assert yaml.safe_load((out / "experiment.yaml").read_text())["inference"]["output_format"] == "npy"


def test_part_store_keeps_exactly_the_finished_parts_of_the_same_job(tmp_path):
    import pandas as pd

    from clip_tao.data.custom import SkipCounter
    from clip_tao.engine.embedding import PartEmbeddings
    from clip_tao.io.embedding_parts import PartStore

    def store(manifest):
        return PartStore(str(tmp_path), str(tmp_path / "parts"), 12, manifest)

    first = store({"model": "a"})
    assert first.prepare() == 0
    rows = np.eye(4, dtype=np.float32)[:3]
    names = ["a.jpg", "line\nbreak ☃.jpg", "s3://b/x.tar/k"]
    first.write(PartEmbeddings(0, rows, None, np.arange(3), names))
    first.write(PartEmbeddings(1, np.zeros((0, 4), np.float32), None, np.zeros(0), [], SkipCounter(missing_image=2)))
    first.write(PartEmbeddings(11, rows[::-1].copy(), None, np.arange(3), names[::-1]))
    # killed while writing part 2 (its .npy is there, no marker) and part 3 (a writer's temporary file)
    np.save(first.npy_path(2), rows)
    stale = tmp_path / "img_emb" / ".img_emb_03.npy.x1y2.tmp"
    stale.write_bytes(b"half")
    # a marker whose .npy was cut short (another tool copying the folder) does not count
    (tmp_path / "parts" / "part_04.json").write_text('{"rows": 3, "skipped": {}}')
    (tmp_path / "img_emb" / "img_emb_04.npy").write_bytes(b"\x93NUMPY")
    assert first.finished() == {0, 1, 11}
    assert sorted(p.name for p in (tmp_path / "img_emb").glob("*.npy"))[:2] == ["img_emb_00.npy", "img_emb_02.npy"]

    again = store({"model": "a"})
    assert again.prepare() == 3 and not stale.exists()
    assert again.totals() == (6, SkipCounter(missing_image=2))
    # the parts joined in part order, read back by h5py and pandas (pyarrow)
    for part in (2, 4):
        os.remove(again.npy_path(part))
    h5 = tmp_path / "image_embeddings.h5"
    assert again.join_h5(str(h5), 4) == 6
    embeddings, paths, attrs = read_h5(h5)
    assert paths == names + names[::-1] and attrs["num_images"] == 6 and attrs["embedding_dim"] == 4
    np.testing.assert_array_equal(embeddings, np.concatenate([rows, rows[::-1]]))
    assert list(pd.read_parquet(again.parquet_path(0))["image_path"]) == names

    other = store({"model": "b"})  # another model: nothing is reused
    assert other.prepare() == 0 and not list((tmp_path / "img_emb").glob("*.npy"))
    assert not list((tmp_path / "parts").glob("part_*.json"))


def test_evaluate_and_inference_relaunch_like_train(monkeypatch, caplog):
    import torch

    from clip_tao.config.schema import EvaluateConfig, InferenceConfig
    from clip_tao.engine.distributed import relaunch_command

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    command, env = relaunch_command(InferenceConfig(num_gpus=2, gpu_ids=[2, 3]), ["inference", "-e", "s.yaml"],
                                    "inference")  # fmt: skip
    assert command[-6:] == ["--nproc_per_node=2", "-m", "clip_tao", "inference", "-e", "s.yaml"]
    assert "--standalone" in command and env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert relaunch_command(EvaluateConfig(num_gpus=1), ["evaluate"], "evaluate") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert relaunch_command(EvaluateConfig(num_gpus=2), ["evaluate"], "evaluate") is None
    assert "evaluate.num_gpus=2 but no GPU is visible" in caplog.text

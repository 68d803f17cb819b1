"""``embed-scale``: ``clip-tao inference`` over the same WebDataset shards with 1, 2, ... processes (torchrun: gloo on
the CPU, one GPU a process where there are enough), images/s and the scaling efficiency (the rate of N processes
over N times the rate of one); then the write throughput of the parts (``.npy`` + ``.parquet`` + marker, as each
process writes them) and of joining them into ``image_embeddings.h5``, on random embeddings of a given size.

The images/s are the run's own: images over the seconds from the first batch until every process's last part
is written (``embed_seconds`` in ``status.json``), so start-up and the join are left out; the wall time of the
whole command is given beside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.core import REPO

NAME = "embed-scale"
HELP = "inference images/s with 1 and 2 processes on the same shards (scaling efficiency); part write throughput"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny-clip", help="a model type that builds offline (random weights)")
    parser.add_argument("--n", type=int, default=1024, help="generated images")
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--source-size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="loader workers a process")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--write-rows", type=int, default=200000, help="rows of the part-writing measurement")
    parser.add_argument("--write-dim", type=int, default=1152)
    parser.add_argument("--write-part", type=int, default=10000, help="rows a part")
    parser.add_argument("--dir", default="/tmp/clip_tao_bench_embed_scale", help="where images and shards go")


def _inference_rate(args, shards: str, processes: int, results: str) -> dict:
    import yaml

    spec = os.path.join(results, "spec.yaml")
    os.makedirs(results, exist_ok=True)
    with open(spec, "w") as f:
        yaml.safe_dump({"results_dir": results, "model": {"type": args.model},
                        "inference": {"wds": {"root_dir": shards, "samples_per_shard": args.per_shard},
                                      "batch_size": args.batch, "num_workers": args.workers}}, f)  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "clip_tao", "inference", "-e", spec]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # clip-tao shares the CPUs out itself
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"inference with {processes} process(es) failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(results, "inference", "status.json")) as f:
        kpi = json.loads(f.read().splitlines()[-1])["kpi"]
    return {"processes": processes, "images": kpi["num_images"], "embed_seconds": kpi["embed_seconds"],
            "images_per_s": round(kpi["num_images"] / kpi["embed_seconds"], 1), "join_seconds": kpi["join_seconds"],
            "command_wall_seconds": round(wall, 2)}  # fmt: skip


def _write_throughput(args, folder: str) -> dict:
    """MB/s of writing parts as the processes do, and of the streamed join into image_embeddings.h5."""
    import numpy as np

    from clip_tao.engine.embedding import PartEmbeddings
    from clip_tao.io.embedding_parts import PartStore

    rng = np.random.default_rng(0)
    num_parts = -(-args.write_rows // args.write_part)
    store = PartStore(os.path.join(folder, "parts"), os.path.join(folder, "parts"), num_parts, {"benchmark": 1})
    store.prepare()
    parts = []
    for p in range(num_parts):
        rows = min(args.write_part, args.write_rows - p * args.write_part)
        emb = rng.standard_normal((rows, args.write_dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        labels = [f"s3://bucket/shards/shard-{p:06d}.tar/{i:09d}" for i in range(rows)]
        parts.append(PartEmbeddings(p, emb, None, np.arange(rows), labels))
    start = time.perf_counter()
    for part in parts:
        store.write(part)
    write_s = time.perf_counter() - start
    megabytes = args.write_rows * args.write_dim * 4 / 1e6
    h5 = os.path.join(folder, "image_embeddings.h5")
    start = time.perf_counter()
    store.join_h5(h5, args.write_dim)
    join_s = time.perf_counter() - start
    return {"rows": args.write_rows, "dim": args.write_dim, "rows_a_part": args.write_part,
            "embedding_mb": round(megabytes, 1), "parts_write_mb_per_s": round(megabytes / write_s, 1),
            "parts_rows_per_s": round(args.write_rows / write_s), "join_h5_mb_per_s": round(megabytes / join_s, 1),
            "h5_mb_on_disk": round(os.path.getsize(h5) / 1e6, 1)}  # fmt: skip


def run(args) -> dict:
    from benchmarks.data import _make_images, _write_shards

    paths = _make_images(os.path.join(args.dir, "images"), args.n, args.source_size)
    shards = os.path.join(args.dir, f"shards_{args.n}_{args.per_shard}")
    _write_shards(shards, paths, args.per_shard)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            runs.append(_inference_rate(args, shards, processes, os.path.join(tmp, f"p{processes}")))
        writes = _write_throughput(args, os.path.join(tmp, "write"))
    base = runs[0]["images_per_s"] / runs[0]["processes"]
    for row in runs:
        row["scaling_efficiency"] = round(row["images_per_s"] / (row["processes"] * base), 3)
    return {"benchmark": "embed-scale", "model": args.model, "images": args.n, "shards": -(-args.n // args.per_shard),
            "batch": args.batch, "workers_a_process": args.workers, "cpus": os.cpu_count(), "runs": runs,
            "part_writes": writes}  # fmt: skip

"""``quickstart``: wall time of ``clip-tao train -e specs/quickstart.yaml`` with ``OMP_NUM_THREADS`` unset and set,
and the machine's load average before and after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.core import REPO

NAME = "quickstart"
HELP = "wall time of the quickstart training, OMP_NUM_THREADS unset and set"


def add_arguments(parser) -> None:
    parser.add_argument("--threads", nargs="+", default=["unset", "1"], help="OMP_NUM_THREADS values ('unset')")


def bench_quickstart(args) -> dict:
    """``clip-tao train -e specs/quickstart.yaml`` end to end, once per ``--threads`` setting."""
    import tempfile

    runs = []
    for threads in args.threads:
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        if threads != "unset":
            env["OMP_NUM_THREADS"] = threads
        with tempfile.TemporaryDirectory() as out:
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "clip_tao.cli", "train", "-e", "specs/quickstart.yaml", f"results_dir={out}"]
            subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - start
        runs.append({"OMP_NUM_THREADS": threads, "seconds": round(seconds, 1),
                     "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]})  # fmt: skip
    return {"benchmark": "quickstart", "runs": runs, "cpus": os.cpu_count()}


run = bench_quickstart

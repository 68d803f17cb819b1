#!/usr/bin/env python
"""Speed and memory of clip-tao's hot paths, measured (never asserted by tests).

    python scripts/benchmark.py train --model tiny-clip --batch 32 --steps 30
    python scripts/benchmark.py embed --model tiny-clip --batch 32
    python scripts/benchmark.py eval --n 5000 --captions-per-image 5 --dim 512 --counting eager compiled
    python scripts/benchmark.py eval --n 200000 --dim 1152 --dense-n 30000
    python scripts/benchmark.py data --n 1024 --size 224 --workers 0 1 2
    python scripts/benchmark.py serve --model tiny-clip --clients 16 --requests 2000
    python scripts/benchmark.py embed --model tiny-siglip2-naflex --batch 32
    python scripts/benchmark.py quickstart --threads unset 1
    python scripts/benchmark.py index --n 1000000 --dim 512   # FAISS indexes: recall, memory, latency
    python scripts/benchmark.py vs-open-clip --workers 0 --runs 5   # needs pandas: pip install -e ".[bench]"
    python scripts/benchmark.py embed-scale --n 1024 --processes 1 2
    python scripts/benchmark.py compositional         # hard negatives: swap accuracy and R@1, with and without
    python scripts/benchmark.py compositional --epochs 150 --negatives-per-sample 3   # the README's +15 points
    python scripts/benchmark.py checkpoint --processes 2 --openclip-arch ViT-B-32   # FSDP: sharded vs gathered

Each benchmark is a module of ``scripts/benchmarks/`` (its docstring says what it measures); the shared
measuring core (machine, peaks, FLOP counts, rates, random-weight models) is ``scripts/benchmarks/core.py``.
The result is printed as JSON, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmarks import MODULES  # noqa: E402 - found through the line above
from benchmarks.core import machine  # noqa: E402


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_eval_child":  # one measurement of ``eval`` in a fresh process
        from benchmarks.evaluation import eval_child

        mode, n, per, dim, chunk = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(eval_child(mode, n, per, dim, chunk, sys.argv[7], sys.argv[8])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    benchmarks = {}
    for name in MODULES:
        module = importlib.import_module(f"benchmarks.{name}")
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__))
        benchmarks[module.NAME] = module
    args = parser.parse_args()
    result = benchmarks[args.what].run(args)
    result["machine"] = machine()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

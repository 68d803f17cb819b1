"""Command line: ``clip-tao <task> -e spec.yaml [key=value ...]`` and ``clip-tao list-models``.

Parses argv, loads the spec, dispatches to a task. Errors meant for the user are caught here once and
printed as one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from clip_tao import __version__, stopping
from clip_tao.engine.launcher import adopt_slurm_environment
from clip_tao.errors import ClipTaoError

TASKS = {
    "train": "fine-tune or train a model on dataset.train, validating on dataset.val",
    "evaluate": "image-text retrieval figures (R@K, mAP, MedR, MeanR, AUC) in both directions",
    "inference": "image and text embeddings as TAO's .h5 files",
    "export": "export to ONNX",
    "gen_trt_engine": "build a TensorRT engine from an ONNX file",
    "serve": "serve embeddings and search over HTTP (Triton's protocol, OpenAI's /v1/embeddings, /embed, /search)",
    "index": "an approximate FAISS index of an embeddings file for a memory budget, with its measured recall",
}

log = logging.getLogger("clip_tao")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-tao",
        description="Fine-tune, evaluate, embed, export and deploy CLIP-style models from TAO experiment specs.",
    )
    parser.add_argument("--version", action="version", version=f"clip-tao {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a sub-command's default must not undo a --debug given before the sub-command.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for task, help_text in TASKS.items():
        p = sub.add_parser(
            task,
            parents=[debug],
            help=help_text,
            description=f"{help_text}. Overrides use Hydra's grammar: a.b=1, a.b=[1,2], +new.key=1, ~a.b.",
        )
        p.add_argument(
            "-e", "--experiment_spec_file", "--experiment-spec", dest="spec", required=True, metavar="SPEC",
            help="experiment spec, YAML or JSON (TAO's format)",
        )  # fmt: skip
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="spec overrides, e.g. train.num_epochs=3")
    lm = sub.add_parser(
        "list-models", parents=[debug], help="list the model types", description="List the model types."
    )
    lm.add_argument(
        "pattern", nargs="?", default="*", help="a word in the name ('radio') or a shell-style filter ('siglip2*')"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    adopt_slurm_environment()  # srun without torchrun: one run of several processes, not several runs
    if argv is None:  # the program itself, not a caller in Python
        # The interpreter's last garbage collection walks every object that torch, transformers and open_clip
        # made: seconds on a busy machine between the final status line and the end of the process.
        atexit.register(gc.freeze)
    _setup_logging()
    # serve: uvicorn stops on SIGINT/SIGTERM itself, after the requests in flight.
    own_stop = args.command not in ("serve", "list-models")
    try:
        with stopping.install() if own_stop else contextlib.nullcontext():
            if args.command == "list-models":
                return _list_models(args.pattern)
            return _run_task(args.command, args.spec, args.overrides)
    except ClipTaoError as exc:
        if args.debug:
            raise
        print(f"clip-tao {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        stopping.acknowledge()
        name = exc.args[0] if exc.args else "SIGINT"
        print(f"clip-tao {args.command}: interrupted ({name})", file=sys.stderr)
        return 128 + getattr(signal, name, signal.SIGINT)


def _run_task(task: str, spec: str, overrides: Sequence[str]) -> int:
    from clip_tao.config import load_experiment
    from clip_tao.config.paths import check_spec_paths

    cfg = load_experiment(spec, overrides)
    try:
        check_spec_paths(cfg, task)  # before any model is built or weights are fetched
    except ClipTaoError as exc:
        if os.environ.get("RANK", "0") in ("", "0"):  # TAO's tools read the outcome from status.json
            from clip_tao.io.status import StatusWriter

            StatusWriter(cfg.task_dir(task)).write("FAILURE", f"{task} failed: {exc}")
        raise
    if task in ("train", "evaluate", "inference"):
        from clip_tao.engine.distributed import relaunch_command

        section = getattr(cfg, task)
        relaunch = relaunch_command(section, [task, "-e", spec, *overrides], task)
        if relaunch is not None:  # <task>.num_gpus > 1 on this node: one process a GPU, under torchrun
            command, env = relaunch
            log.info("starting %d processes: %s", section.num_gpus, " ".join(command))
            return _run_torchrun(command, env)
    from clip_tao.threads import set_main_process_threads

    set_main_process_threads(cfg.train.num_threads, _loader_workers(cfg, task))
    module = importlib.import_module(f"clip_tao.tasks.{task}")
    module.run(cfg)
    return 0


def _run_torchrun(command: list[str], env: dict[str, str]) -> int:
    """Run torchrun until it ends. On a stop it gets the signal too and stops its processes (each writes its
    final status); killing it, as ``subprocess.run`` does, would leave them training."""
    import subprocess

    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        stopping.acknowledge()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(getattr(signal, stopping.requested() or "SIGINT"))
        process.wait()
        raise


def _loader_workers(cfg, task: str) -> int:
    """Loader worker processes the task runs beside the main one (they share the CPUs). Training counts
    its training workers: validation sets its own count while it runs (see ``Trainer.validate``)."""
    if task == "train":
        return cfg.dataset.train.num_workers
    section = getattr(cfg, task, None)
    return getattr(section, "num_workers", 0) or 0


def _list_models(pattern: str) -> int:
    from clip_tao.io.tables import format_table
    from clip_tao.models import list_models

    # A plain word matches anywhere in the name, as users expect from a search box.
    infos = list_models(pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")
    if not infos:
        print(f"no model type matches {pattern!r}; run `clip-tao list-models` for all of them")
        return 1
    rows = [[i.name, i.family, i.image_size, i.embed_dim, i.context_length, i.weights] for i in infos]
    print(format_table(["type", "family", "image size", "embed dim", "context", "weights"], rows))
    return 0


def _setup_logging() -> None:
    # Under torchrun every process logs; only rank 0 tells the story, the others report problems only.
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank in ("", "0") else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "open_clip", "timm", "urllib3", "PIL", "matplotlib", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub prints through a handler of its own: passing its records on too would print each twice.
    logging.getLogger("huggingface_hub").propagate = False


if __name__ == "__main__":
    raise SystemExit(main())

"""Check every local path a task will read before anything is built.

Building a model can take a while (and fetching weights much longer); a typo in a data path should not be
found after that, nor hide behind a weights error. All missing paths are reported together, on one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from clip_tao.config.schema import DatasetEntry, ExperimentConfig, WdsConfig
from clip_tao.errors import ConfigError


def check_spec_paths(cfg: ExperimentConfig, task: str) -> None:
    """Raise :class:`ConfigError` naming every path of ``task``'s spec keys that does not exist."""
    missing = [_problem(key, path, kind) for key, path, kind in _paths(cfg, task) if not _exists(path, kind)]
    if missing:
        raise ConfigError(f"{'; '.join(missing)}: fix the spec, or override with key=value")


def _problem(key: str, path: str, kind: str) -> str:
    if os.path.exists(path):
        return f"{key} {path!r} is not a {kind}"
    return f"{key} {path!r} does not exist"


def _exists(path: str, kind: str) -> bool:
    if path.startswith("s3://"):
        return True  # checked when the shard list is read
    if kind == "folder":
        return os.path.isdir(path)
    if kind == "file":
        return os.path.isfile(path)
    return os.path.exists(path)


def _paths(cfg: ExperimentConfig, task: str) -> Iterator[tuple[str, str, str]]:
    """``(spec key, path, "file" | "folder" | "file or folder")`` of what ``task`` reads."""
    m = cfg.model
    for key in ("pretrained_path", "text_pretrained_path"):
        if getattr(m, key):
            yield f"model.{key}", getattr(m, key), "file or folder"
    for key in ("tokenizer_path", "radio_repo_dir"):
        if getattr(m, key):
            yield f"model.{key}", getattr(m, key), "folder"
    if task == "train":
        t = cfg.train
        for key in ("resume_training_checkpoint_path", "pretrained_model_path"):
            if getattr(t, key):
                yield f"train.{key}", getattr(t, key), "file or folder"  # a folder: a sharded checkpoint
        yield from _data(cfg.dataset.train.type, cfg.dataset.train.datasets, cfg.dataset.train.wds, "dataset.train")
        yield from _data(cfg.dataset.val.type, cfg.dataset.val.datasets, cfg.dataset.val.wds, "dataset.val")
    elif task in ("evaluate", "inference"):
        s = getattr(cfg, task)
        if s.checkpoint:
            yield f"{task}.checkpoint", s.checkpoint, "file or folder"
        if s.datasets:
            yield from _data("custom", s.datasets, None, task)
        elif s.wds.root_dir or s.wds.shard_list_file:
            yield from _data("wds", [], s.wds, task)
        elif task == "evaluate" and s.mode == "retrieval":
            yield from _data(cfg.dataset.val.type, cfg.dataset.val.datasets, cfg.dataset.val.wds, "dataset.val")
        files = (
            ("classnames_file", "templates_file", "pairs_file")
            if task == "evaluate"
            else ("text_file", "image_embeddings_file", "index_file")
        )
        for key in files:
            if getattr(s, key):
                yield f"{task}.{key}", getattr(s, key), "file"
        for i, path in enumerate(getattr(s, "query_images", [])):
            yield f"{task}.query_images[{i}]", path, "file or folder"
    elif task == "index" and cfg.index.embeddings_file:
        yield "index.embeddings_file", cfg.index.embeddings_file, "file or folder"
    elif task == "export" and cfg.export.checkpoint:
        yield "export.checkpoint", cfg.export.checkpoint, "file or folder"


def _data(kind: str, entries: list[DatasetEntry], wds: WdsConfig | None, section: str):
    if kind == "wds" and wds is not None:
        if wds.shard_list_file:
            yield f"{section}.wds.shard_list_file", wds.shard_list_file, "file"
        elif wds.root_dir:
            yield f"{section}.wds.root_dir", wds.root_dir, "folder"
        return
    for i, entry in enumerate(entries):
        where = f"{section}.datasets[{i}]"
        if entry.image_dir:
            yield f"{where}.image_dir", entry.image_dir, "folder"
        if entry.caption_dir:
            yield f"{where}.caption_dir", entry.caption_dir, "folder"
        if entry.negative_caption_dir:
            yield f"{where}.negative_caption_dir", entry.negative_caption_dir, "folder"
        if entry.image_list_file:
            yield f"{where}.image_list_file", entry.image_list_file, "file"

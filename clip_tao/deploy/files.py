"""Where exported files live and how to find them again.

``export.onnx_file=/x/clip.onnx`` writes ``/x/clip.onnx`` (combined) or ``/x/clip_vision.onnx`` +
``/x/clip_text.onnx`` (separate), and beside them ``/x/clip_config.yaml`` (the spec with the learned
logit scale/bias and a ``deploy`` section) and ``/x/clip_tokenizer/``. Engines follow the same scheme.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from clip_tao.errors import DataError

ENCODERS = ("vision", "text")


def base_of(path: str, ext: str) -> str:
    """``/x/clip.onnx`` or ``/x/clip_vision.onnx`` -> ``/x/clip``."""
    stem = path[: -len(ext)] if path.endswith(ext) else path
    for encoder in ENCODERS:
        if stem.endswith(f"_{encoder}"):
            return stem[: -len(encoder) - 1]
    return stem


@dataclass(frozen=True)
class DeployFiles:
    """The encoder files of one export (``combined``, or ``vision`` and/or ``text``) and their companions."""

    base: str
    ext: str
    encoders: dict[str, str]  # "combined" | "vision" | "text" -> path

    @property
    def config(self) -> str:
        return f"{self.base}_config.yaml"

    @property
    def tokenizer(self) -> str:
        return f"{self.base}_tokenizer"

    @property
    def combined(self) -> bool:
        return "combined" in self.encoders


def planned_files(path: str, ext: str, encoder_type: str) -> DeployFiles:
    """The files an export (or engine build) *will* write for ``path``."""
    base = base_of(path, ext)
    if encoder_type == "combined":
        return DeployFiles(base, ext, {"combined": f"{base}{ext}"})
    return DeployFiles(base, ext, {e: f"{base}_{e}{ext}" for e in ENCODERS})


def find_files(path: str, ext: str, key: str) -> DeployFiles:
    """The encoder files that exist for ``path``: itself if combined, else the ``_vision``/``_text`` pair.

    ``key`` names the spec key in errors (``evaluate.onnx_file``).
    """
    base = base_of(path, ext)
    if os.path.isfile(path) and not any(path == f"{base}_{e}{ext}" for e in ENCODERS):
        return DeployFiles(base, ext, {"combined": path})
    found = {e: f"{base}_{e}{ext}" for e in ENCODERS if os.path.isfile(f"{base}_{e}{ext}")}
    if not found:
        raise DataError(
            f"{key}={path!r}: no such file, and no {os.path.basename(base)}_vision{ext} / _text{ext} beside it"
        )
    return DeployFiles(base, ext, found)


def check_overwritable(files: DeployFiles, tokenizer_marker: str) -> None:
    """Refuse to replace what an export did not write: a folder under an ONNX/engine/config file's name,
    or a ``_tokenizer`` folder without the tokenizer settings file ``tokenizer_marker`` that export writes."""
    for path in [*files.encoders.values(), *(p + ".data" for p in files.encoders.values()), files.config]:
        if os.path.isdir(path):
            raise DataError(f"{path} is a folder: overwrite replaces only exported files; choose another file name")
    tokenizer = files.tokenizer
    if os.path.lexists(tokenizer) and not os.path.isfile(os.path.join(tokenizer, tokenizer_marker)):
        raise DataError(
            f"{tokenizer} exists but is not a tokenizer folder written by export (no {tokenizer_marker}); "
            "move it away or choose another file name"
        )


def export_lock_path(path: str, ext: str = ".onnx") -> str:
    """The lock file that an export to ``path`` holds: hidden, beside the files, one for all encoders."""
    base = base_of(path, ext)
    return os.path.join(os.path.dirname(os.path.abspath(base)), f".{os.path.basename(base)}.export.lock")

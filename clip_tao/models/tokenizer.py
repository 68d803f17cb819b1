"""Tokenizers: text -> fixed-length ``[B, L]`` int64 token ids, as the model was trained with."""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Sequence

import torch

CONFIG_FILE = "clip_tao_tokenizer.json"

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace (SigLIP's text canonicalisation)."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


class Tokenizer:
    """Base: subclasses implement ``_encode`` for already-canonicalised texts.

    A subclass has a ``kind`` (its name in model configs and saved folders), saves whatever files it
    needs in ``_save_files`` and is rebuilt from such a folder by ``_from_folder``.
    """

    kind = ""

    def __init__(self, context_length: int, canonicalize: bool = False):
        self.context_length = context_length
        self.canonicalize = canonicalize

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if self.canonicalize:
            texts = [canonicalize_text(t) for t in texts]
        return self._encode(list(texts))

    def _encode(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} does not implement _encode")

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write everything needed to tokenize exactly like this without the model (export, deploy)."""
        os.makedirs(folder, exist_ok=True)
        self._save_files(os.fspath(folder))
        settings = {"kind": self.kind, "context_length": self.context_length, "canonicalize": self.canonicalize}
        with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)

    def _save_files(self, folder: str) -> None:
        """Subclasses with vocabulary files write them here."""

    @classmethod
    def _from_folder(cls, folder: str, context_length: int, canonicalize: bool) -> Tokenizer:
        return cls(context_length, canonicalize)


class OpenClipBpeTokenizer(Tokenizer):
    """open_clip's byte-pair tokenizer; its 49,408-token vocabulary ships inside open_clip (no download).

    Pads with 0 to ``context_length`` and puts end-of-text last when a text is too long.
    """

    kind = "openclip-bpe"
    vocab_size = 49408

    def __init__(self, context_length: int = 77, canonicalize: bool = False):
        super().__init__(context_length, canonicalize)
        from open_clip.tokenizer import SimpleTokenizer

        self._bpe = SimpleTokenizer(context_length=context_length)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self._bpe(texts, context_length=self.context_length)

    def _save_files(self, folder: str) -> None:
        # The vocabulary ships with open_clip; a copy makes the folder self-describing.
        import shutil

        from open_clip.tokenizer import default_bpe

        shutil.copyfile(default_bpe(), os.path.join(folder, os.path.basename(default_bpe())))


class HfTokenizer(Tokenizer):
    """A Hugging Face tokenizer (Gemma for SigLIP2, BERT-uncased for NV-CLIP) at a fixed length.

    Texts are whitespace-cleaned (and canonicalised when asked), then padded to ``context_length`` and
    truncated, as the families' own processors do. ``strip_sep_token`` replaces [SEP] by padding, as
    open_clip's ``HFTokenizer`` does for the CLIPA / NV-CLIP text towers.
    """

    kind = "hf"
    OPTIONS_FILE = "clip_tao_hf_options.json"

    def __init__(self, source: str, context_length: int, canonicalize: bool = False, strip_sep_token: bool = False):
        super().__init__(context_length, canonicalize)
        self.source = source
        self.strip_sep_token = strip_sep_token
        self._tok = load_hf_tokenizer(source)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        texts = [" ".join(t.split()) for t in texts]
        ids = self._tok(
            texts, return_tensors="pt", max_length=self.context_length, padding="max_length", truncation=True
        ).input_ids
        if self.strip_sep_token and self._tok.sep_token_id is not None:
            ids = torch.where(ids == self._tok.sep_token_id, torch.zeros_like(ids), ids)
        return ids.long()

    def _save_files(self, folder: str) -> None:
        self._tok.save_pretrained(folder)
        with open(os.path.join(folder, self.OPTIONS_FILE), "w", encoding="utf-8") as f:
            json.dump({"strip_sep_token": self.strip_sep_token, "source": self.source}, f, indent=2)

    @classmethod
    def _from_folder(cls, folder: str, context_length: int, canonicalize: bool) -> Tokenizer:
        options = {}
        path = os.path.join(folder, cls.OPTIONS_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                options = json.load(f)
        return cls(folder, context_length, canonicalize, strip_sep_token=options.get("strip_sep_token", False))


def load_hf_tokenizer(source: str):
    """``AutoTokenizer`` from a local folder or a hub id (the HF cache serves it offline)."""
    from clip_tao.errors import ModelError
    from clip_tao.models.hub_cli import download_command, prepare_hub

    if not os.path.isdir(source):
        prepare_hub()
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if os.path.isdir(source):
            raise ModelError(f"tokenizer folder {source!r} cannot be loaded: {_first_line(exc)}") from exc
        raise ModelError(
            f"tokenizer {source!r} is not reachable ({_first_line(exc)}): pre-fetch it with "
            f"`{download_command(source)}` (then HF_HUB_OFFLINE=1 works) or give a local folder "
            "with model.tokenizer_path"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {
    OpenClipBpeTokenizer.kind: OpenClipBpeTokenizer,
    HfTokenizer.kind: HfTokenizer,
}


def build_tokenizer(kind: str, context_length: int, canonicalize: bool = False) -> Tokenizer:
    """The tokenizer named in a model config (a key of :data:`TOKENIZER_KINDS`)."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(TOKENIZER_KINDS)}")
    return TOKENIZER_KINDS[kind](context_length, canonicalize)


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Rebuild a tokenizer saved by :meth:`Tokenizer.save_pretrained`."""
    from clip_tao.errors import ModelError

    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ModelError(f"{os.fspath(folder)!r} holds no saved tokenizer ({CONFIG_FILE} is missing)")
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    kind = settings["kind"]
    if kind not in TOKENIZER_KINDS:
        raise ModelError(f"tokenizer in {os.fspath(folder)!r} is of unknown kind {kind!r}")
    return TOKENIZER_KINDS[kind]._from_folder(os.fspath(folder), settings["context_length"], settings["canonicalize"])

"""Tokenizers: text -> fixed-length ``[B, L]`` int64 token ids, as the model was trained with."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace (SigLIP's text canonicalisation)."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


class Tokenizer:
    """Base: subclasses implement ``_encode`` for already-canonicalised texts."""

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


class OpenClipBpeTokenizer(Tokenizer):
    """open_clip's byte-pair tokenizer; its 49,408-token vocabulary ships inside open_clip (no download).

    Pads with 0 to ``context_length`` and puts end-of-text last when a text is too long.
    """

    vocab_size = 49408

    def __init__(self, context_length: int = 77, canonicalize: bool = False):
        super().__init__(context_length, canonicalize)
        from open_clip.tokenizer import SimpleTokenizer

        self._bpe = SimpleTokenizer(context_length=context_length)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self._bpe(texts, context_length=self.context_length)


def build_tokenizer(kind: str, context_length: int, canonicalize: bool = False) -> Tokenizer:
    """The tokenizer named in a model config (``"openclip-bpe"``)."""
    if kind == "openclip-bpe":
        return OpenClipBpeTokenizer(context_length, canonicalize)
    raise ValueError(f"unknown tokenizer kind {kind!r}")

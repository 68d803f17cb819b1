"""Run a model over a loader and collect L2-normalised embeddings."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from clip_tao.data.custom import SkipCounter
from clip_tao.data.loaders import iterate_batches
from clip_tao.engine.device import Precision
from clip_tao.engine.finite import check_embeddings
from clip_tao.models.base import ClipModel


@dataclass
class Embeddings:
    """``image`` / ``text`` ``[N, D]`` float32 on the CPU; ``indices`` are dataset positions of the rows;
    ``text_ids`` ``[N, L]`` the token ids the text rows were encoded from."""

    image: torch.Tensor | None
    text: torch.Tensor | None
    indices: torch.Tensor
    skipped: SkipCounter = field(default_factory=SkipCounter)
    text_ids: torch.Tensor | None = None


@torch.no_grad()
def embed_loader(
    model: ClipModel,
    loader,
    device: torch.device,
    precision: Precision,
    desc: str = "embed",
    texts: bool = True,
) -> Embeddings:
    """Image (and, when batches carry ``input_ids`` and ``texts``, text) embeddings of every good sample."""
    was_training = model.training
    model.eval()
    images, captions, ids, indices, skipped = [], [], [], [], SkipCounter()
    with contextlib.closing(iterate_batches(loader)) as stream:  # workers shut down here, even on an error
        for batch in tqdm(stream, desc=desc, unit="batch", leave=False, total=_length(loader)):
            skipped.update(batch["skipped"])
            if "pixels" not in batch:
                continue
            with precision.autocast(device):
                images.append(model.encode_image(batch["pixels"].to(device, non_blocking=True)).float().cpu())
                if texts and "input_ids" in batch:
                    captions.append(model.encode_text(batch["input_ids"].to(device, non_blocking=True)).float().cpu())
                    ids.append(batch["input_ids"].cpu())
            indices.append(batch["indices"])
    model.train(was_training)
    result = Embeddings(
        image=torch.cat(images) if images else None,
        text=torch.cat(captions) if captions else None,
        indices=torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        skipped=skipped,
        text_ids=torch.cat(ids) if ids else None,
    )
    check_embeddings(result.image, "image")
    check_embeddings(result.text, "text")
    return result


def _length(loader) -> int | None:
    """Batches in ``loader`` for the progress bar (``None`` for a stream without a length)."""
    try:
        return len(loader)
    except TypeError:
        return None


@torch.no_grad()
def embed_texts(
    model: ClipModel, texts: Sequence[str], device: torch.device, precision: Precision, batch_size: int
) -> torch.Tensor:
    """``[len(texts), D]`` text embeddings, tokenised with the model's own tokenizer."""
    model.eval()
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embed texts", unit="batch", leave=False):
        ids = model.tokenizer(list(texts[start : start + batch_size])).to(device)
        with precision.autocast(device):
            out.append(model.encode_text(ids).float().cpu())
    result = torch.cat(out) if out else torch.zeros(0, model.embed_dim)
    check_embeddings(result, "text")
    return result


def share_equal_inputs(embeddings: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``embeddings`` with every row of an input seen before replaced by the first such row's embedding.

    A model may round the same input differently at another batch position or in a batch of another size
    (the kernels treat the edges of their blocks apart), so repeated captions would come out a few ulps
    apart and retrieval would break their ties by that rounding. Shared, they tie exactly in every backend.
    ``inputs`` ``[N, ...]``: what each row was computed from (token ids).
    """
    if len(inputs) < 2:
        return embeddings
    _, group = torch.unique(inputs.reshape(len(inputs), -1), dim=0, return_inverse=True)
    position = torch.arange(len(group))
    first = torch.full_like(position, len(group)).scatter_reduce_(0, group, position, "amin")[group]
    return embeddings if torch.equal(first, position) else embeddings[first]


@dataclass
class PartEmbeddings:
    """The embeddings of one part (see :mod:`clip_tao.data.parts`), rows in the part's order."""

    part: int
    image: np.ndarray  # [n, D] float32
    text: np.ndarray | None  # [n, D] of each image's first caption, when the batches carried captions
    indices: np.ndarray  # [n] dataset positions (image folders) or offsets in the shard
    labels: list[str]  # image path, or "<shard>/<key>"
    skipped: SkipCounter = field(default_factory=SkipCounter)
    text_ids: np.ndarray | None = None  # [n, L] the captions' token ids (see share_equal_inputs)


class _PartBuffer:
    def __init__(self):
        self.images, self.texts, self.text_ids, self.indices, self.labels = [], [], [], [], []
        self.skipped = SkipCounter()

    def finish(self, part: int, dim: int, check_finite: bool) -> PartEmbeddings:
        image = torch.cat(self.images) if self.images else torch.zeros(0, dim)
        text = torch.cat(self.texts) if self.texts else None
        if check_finite:
            check_embeddings(image, "image")
            check_embeddings(text, "text")
        indices = torch.cat(self.indices).numpy() if self.indices else np.zeros(0, dtype=np.int64)
        ids = torch.cat(self.text_ids).numpy() if self.text_ids else None
        return PartEmbeddings(part, image.numpy(), None if text is None else text.numpy(), indices, self.labels,
                              self.skipped, ids)  # fmt: skip


@torch.no_grad()
def embed_parts(
    model: ClipModel,
    loader,
    device: torch.device,
    precision: Precision,
    on_part: Callable[[PartEmbeddings], None],
    texts: bool = False,
    total: int | None = None,
    desc: str = "embed",
    progress: bool = True,
    check_finite: bool = True,
) -> None:
    """Embed the batches of a :class:`~clip_tao.data.parts.PartStream`; hand each part to ``on_part`` as soon
    as its last batch is done, so no more than the parts in flight (one a loader worker) are held.

    ``check_finite``: refuse a part with a NaN/inf embedding before it is handed on (``False``: the caller
    checks, e.g. on everything gathered)."""
    was_training = model.training
    model.eval()
    buffers: dict[int, _PartBuffer] = {}
    with tqdm(total=total, desc=desc, unit="img", leave=False, disable=not progress) as bar:
        _embed_batches(model, loader, device, precision, on_part, texts, check_finite, buffers, bar)
    model.train(was_training)


def _embed_batches(model, loader, device, precision, on_part, texts, check_finite, buffers, bar) -> None:
    with contextlib.closing(iterate_batches(loader)) as stream:  # workers shut down here, even on an error
        for batch in stream:
            _add_batch(model, batch, device, precision, on_part, texts, check_finite, buffers, bar)


def _add_batch(model, batch, device, precision, on_part, texts, check_finite, buffers, bar) -> None:
    """One batch of a part into its buffer; a finished part goes to ``on_part``."""
    buffer = buffers.setdefault(batch["part"], _PartBuffer())
    buffer.skipped.update(batch["skipped"])
    if "pixels" in batch:
        with precision.autocast(device):
            buffer.images.append(model.encode_image(batch["pixels"].to(device, non_blocking=True)).float().cpu())
            if texts and "input_ids" in batch:
                ids = batch["input_ids"].to(device, non_blocking=True)
                buffer.texts.append(model.encode_text(ids).float().cpu())
                buffer.text_ids.append(batch["input_ids"].cpu())
        buffer.indices.append(batch["indices"])
        buffer.labels += batch["labels"]
        bar.update(len(batch["labels"]))
    if batch["last"]:
        on_part(buffers.pop(batch["part"]).finish(batch["part"], model.embed_dim, check_finite))

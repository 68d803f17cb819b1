"""Run a model over a loader and collect L2-normalised embeddings."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from clip_tao.data.custom import SkipCounter
from clip_tao.data.loaders import iterate_batches
from clip_tao.engine.device import Precision
from clip_tao.engine.finite import check_embeddings
from clip_tao.models.base import ClipModel


@dataclass
class Embeddings:
    """``image`` / ``text`` ``[N, D]`` float32 on the CPU; ``indices`` are dataset positions of the rows."""

    image: torch.Tensor | None
    text: torch.Tensor | None
    indices: torch.Tensor
    skipped: SkipCounter = field(default_factory=SkipCounter)


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
    images, captions, indices, skipped = [], [], [], SkipCounter()
    with contextlib.closing(iterate_batches(loader)) as stream:  # workers shut down here, even on an error
        for batch in tqdm(stream, desc=desc, unit="batch", leave=False, total=_length(loader)):
            skipped.update(batch["skipped"])
            if "pixels" not in batch:
                continue
            with precision.autocast(device):
                images.append(model.encode_image(batch["pixels"].to(device, non_blocking=True)).float().cpu())
                if texts and "input_ids" in batch:
                    captions.append(model.encode_text(batch["input_ids"].to(device, non_blocking=True)).float().cpu())
            indices.append(batch["indices"])
    model.train(was_training)
    result = Embeddings(
        image=torch.cat(images) if images else None,
        text=torch.cat(captions) if captions else None,
        indices=torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        skipped=skipped,
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

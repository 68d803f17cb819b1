"""Run a model over a loader and collect L2-normalised embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from clip_tao.data.custom import SkipCounter
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
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
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

"""Geometry-preserving fine-tuning (``regularization`` section, TAO 7.0.1 keys).

A frozen copy of the starting model (the teacher) embeds every training batch too; the loss adds

- ``embedding_mse_weight`` × MSE(student, teacher embeddings), images and texts averaged,
- ``cosine_weight`` × (1 − cosine(student, teacher)), likewise,
- ``similarity_weight`` × MSE of the image–text similarity matrices (student vs teacher),

so the fine-tuned embeddings cannot drift far from the space they started in. Every process runs its
own teacher without gradients on its own batch (no extra communication under DDP).

TAO 7.3 logs the terms as ``train/contrastive_loss``, ``train/emb_mse_loss``, ``train/cosine_loss`` and
``train/sim_loss``, and at validation the drift from the teacher, ``val/img_drift`` / ``val/txt_drift`` (1 − mean
cosine of student and teacher embeddings of the validation images / captions) and ``val/embedding_drift`` (their
mean): the same names are written here (TensorBoard and status.json), beside clip-tao's ``reg_*``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clip_tao.config.schema import RegularizationConfig
from clip_tao.engine.device import Precision

TERMS = ("embedding_mse", "cosine", "similarity")
# A step's figure -> TAO 7.3's log name.
TAO_NAMES = {
    "contrastive_loss": "train/contrastive_loss",
    "embedding_mse": "train/emb_mse_loss",
    "cosine": "train/cosine_loss",
    "similarity": "train/sim_loss",
    "triplet_loss": "train/triplet_loss",
    "compatible_positive_pairs_per_rank": "train/compatible_positive_pairs_per_rank",
}
# An epoch's KPI (status.json) -> TAO 7.3's name.
TAO_KPI_NAMES = {
    "contrastive_loss": "train/contrastive_loss",
    "reg_embedding_mse": "train/emb_mse_loss",
    "reg_cosine": "train/cosine_loss",
    "reg_similarity": "train/sim_loss",
    "triplet_loss": "train/triplet_loss",
    "compatible_positive_pairs_per_rank": "train/compatible_positive_pairs_per_rank",
    "img_drift": "val/img_drift",
    "txt_drift": "val/txt_drift",
    "embedding_drift": "val/embedding_drift",
}


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its current weights, without gradients, in eval mode."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


class RegularizedLoss(nn.Module):
    """``base(image, text, scale, bias)`` plus the weighted preservation terms against the teacher.

    :meth:`set_batch` embeds the step's pairs with the teacher first; the embeddings passed to ``forward``
    must be those pairs' in the same order (all micro-batches of an accumulated step, concatenated).
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, cfg: RegularizationConfig, precision: Precision):
        super().__init__()
        self.base = base
        self.teacher = teacher
        self.weights = {
            "embedding_mse": cfg.embedding_mse_weight,
            "cosine": cfg.cosine_weight,
            "similarity": cfg.similarity_weight,
        }
        self.precision = precision
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sums = dict.fromkeys(("contrastive_loss", *TERMS), 0.0)
        self._count = 0

    @torch.no_grad()
    def set_batch(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        images, texts = [], []
        with self.precision.autocast(device):
            for pixels, input_ids, *_ in pairs:  # hard negatives, if any, are no pairs
                images.append(self.teacher.encode_image(pixels.to(device)).float())
                texts.append(self.teacher.encode_text(input_ids.to(device)).float())
        self._targets = torch.cat(images), torch.cat(texts)
        self._count += 1

    def forward(self, image, text, logit_scale, logit_bias, **pairs) -> torch.Tensor:
        contrastive = self.base(image, text, logit_scale, logit_bias, **pairs)
        teacher_image, teacher_text = self._targets
        terms = preservation_terms(image, text, teacher_image, teacher_text)
        total = contrastive + sum(self.weights[k] * terms[k] for k in TERMS)
        # The last call of a step is the one whose figures count (every call sees the whole step's pairs).
        # A base with figures of its own (the triplet term) gives its pure contrastive part and its terms.
        inner = getattr(self.base, "last_figures", {})
        self._last = {"contrastive_loss": contrastive.detach(), **inner, **{k: v.detach() for k, v in terms.items()}}
        return total

    def end_step(self) -> dict[str, float]:
        """The step's separate figures (for logging); adds them to the epoch's means."""
        figures = {k: float(v) for k, v in self._last.items()}
        for k, v in figures.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        return figures

    def epoch_figures(self) -> dict[str, float]:
        """Means over the epoch's steps (``reg_*`` and ``contrastive_loss``); resets the sums."""
        steps = max(self._count, 1)
        out = {(f"reg_{k}" if k in TERMS else k): v / steps for k, v in self._sums.items()}
        self._sums = dict.fromkeys(("contrastive_loss", *TERMS), 0.0)
        self._count = 0
        return out


def preservation_terms(
    image: torch.Tensor, text: torch.Tensor, teacher_image: torch.Tensor, teacher_text: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The three unweighted terms for L2-normalised ``[B, D]`` student and teacher embeddings."""
    mse = (F.mse_loss(image, teacher_image) + F.mse_loss(text, teacher_text)) / 2
    cosine = (
        (1 - F.cosine_similarity(image, teacher_image, dim=-1)).mean()
        + (1 - F.cosine_similarity(text, teacher_text, dim=-1)).mean()
    ) / 2
    similarity = F.mse_loss(image @ text.T, teacher_image @ teacher_text.T)
    return {"embedding_mse": mse, "cosine": cosine, "similarity": similarity}


def embedding_drift(student, teacher) -> dict[str, float]:
    """TAO's validation drift from two :class:`~clip_tao.engine.embedding.Embeddings` of the same samples."""
    image = 1 - F.cosine_similarity(student.image, teacher.image, dim=-1).mean()
    text = 1 - F.cosine_similarity(student.text, teacher.text, dim=-1).mean()
    return {"img_drift": float(image), "txt_drift": float(text), "embedding_drift": float(image + text) / 2}


def tao_regularization_kpi(kpi: dict) -> dict[str, float]:
    """TAO 7.3's names of the epoch's regularisation figures (``reg_cosine`` -> ``train/cosine_loss`` ...)."""
    return {theirs: kpi[ours] for ours, theirs in TAO_KPI_NAMES.items() if isinstance(kpi.get(ours), (int, float))}

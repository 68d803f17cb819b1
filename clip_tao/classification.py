"""Zero-shot classification with a CLIP model: class embeddings from prompt templates, and its figures.

Class embedding = the L2-normalised mean of the normalised text embeddings of every template filled with
the class name (the CLIP paper's prompt ensembling). A prediction is the class of highest cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a bright photo of a {}.",
    "an image of a {}.",
)


def class_embeddings(
    embed_texts: Callable[[list[str]], torch.Tensor], classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """``[C, D]`` L2-normalised class embeddings; ``embed_texts(list) -> [n, D]`` normalised embeddings."""
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    embeddings = embed_texts(prompts).float().reshape(len(classnames), len(templates), -1)
    return F.normalize(embeddings.mean(1), dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1 / top-5 accuracy and mean per-class recall (percent), the confusion matrix and per-class rows.

    ``logits`` ``[N, C]`` (higher is more likely), ``labels`` ``[N]`` class indices.
    """
    labels = labels.long()
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    predicted = topk[:, 0]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    support = confusion.sum(1)
    correct = np.diag(confusion)
    predicted_count = confusion.sum(0)
    present = support > 0
    recall = np.divide(correct, support, out=np.zeros(num_classes), where=present)
    precision = np.divide(correct, predicted_count, out=np.zeros(num_classes), where=predicted_count > 0)
    return {
        "top1": float((predicted == labels).double().mean() * 100),
        "top5": float((topk == labels.unsqueeze(1)).any(1).double().mean() * 100),
        "mean_per_class_recall": float(recall[present].mean() * 100),
        "num_images": int(len(labels)),
        "num_classes": num_classes,
        "confusion": confusion,
        "per_class": [
            {"support": int(support[c]), "recall": float(recall[c] * 100), "precision": float(precision[c] * 100)}
            for c in range(num_classes)
        ],
    }

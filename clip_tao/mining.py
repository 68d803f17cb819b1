"""Hard-negative mining: for each image, the captions of *other* images it scores highest.

The candidates are the distinct captions of the collection, searched with the same :class:`ImageIndex`
(PyTorch or FAISS) as ``inference.mode: search``. False-negative guards: a caption equal to one of the
image's own captions (compared after ``canonicalize_text`` when the model canonicalises) is never a negative,
candidates scoring above ``max_similarity`` (cosine) are skipped as likely descriptions of the image, and
with attribute metadata a candidate the metadata finds compatible with the image (``compatible``, see
:func:`clip_tao.data.pas_metadata.metadata_guard`) is skipped too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from clip_tao.search import ImageIndex


def mine_negatives(
    image_emb: np.ndarray,
    own_captions: Sequence[Sequence[str]],
    candidates: Sequence[str],
    candidate_emb: np.ndarray,
    per_image: int,
    max_similarity: float | None = None,
    canonical: Callable[[str], str] = lambda text: text,
    use_faiss: bool = False,
    compatible: Callable[[int, str], bool] | None = None,
) -> tuple[list[list[tuple[str, float]]], Counter]:
    """``(negatives, guarded)``: for image ``i`` up to ``per_image`` ``(caption, score)``, best first, and the
    number of candidates each guard dropped (``own_caption``, ``above_max_similarity``, ``metadata_compatible``).
    ``compatible(i, key)``: whether the metadata says the caption (``key``: after ``canonical``) describes image
    ``i``."""
    index = ImageIndex(candidate_emb, use_faiss=use_faiss)
    keys = [canonical(c) for c in candidates]
    owned = [{canonical(c) for c in own} for own in own_captions]
    result: list[list[tuple[str, float]]] = [[] for _ in own_captions]
    guarded: Counter = Counter()
    pending = list(range(len(own_captions)))
    k = min(len(candidates), per_image + max((len(o) for o in owned), default=0) + 8)
    while pending:
        scores, indices = index.search(image_emb[pending], k)
        short = []
        for row, image in enumerate(pending):
            picked, seen, drops = [], set(), Counter()
            for score, j in zip(scores[row], indices[row]):
                key = keys[j]
                if key in owned[image]:
                    drops["own_caption"] += 1
                elif max_similarity is not None and score > max_similarity:
                    drops["above_max_similarity"] += 1
                elif compatible is not None and compatible(image, key):
                    drops["metadata_compatible"] += 1
                elif key not in seen:  # captions equal after canonicalisation count once
                    seen.add(key)
                    picked.append((candidates[j], float(score)))
                if len(picked) == per_image:
                    break
            if len(picked) < per_image and k < len(candidates):
                short.append(image)  # search deeper for this image
            else:
                result[image] = picked
                guarded.update(drops)
        pending = short
        k = min(len(candidates), k * 4)
    return result, guarded

"""TAO 7.3's metadata-match validation (``dataset.val.metadata_match_eval``): PAS figures instead of paired ones.

Each validation dataset's pairs file (``attribute_pairs_file``, else ``<stem>_pairs.json`` beside its list) is read
once. At a validation, every row must have been embedded: the first image embedding of each ``(dataset,
image_path)`` and the first text embedding of each caption are kept, and :func:`clip_tao.pas.evaluate_pas` ranks
with ``dataset.val.metadata_match_mode``. The KPIs are TAO's ``val/pas/{easy,medium,hard,overall}_{mAP,rank1,rank5}``
(clip-tao's own names: ``pas/...``), beside clip-tao's exact figures for the same queries (``pas/<type>_t2i_R@1``
..., see :func:`clip_tao.pas.exact_figures`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clip_tao.config.schema import ValDataConfig
from clip_tao.data.custom import _read_image_list
from clip_tao.data.pas_metadata import load_metadata, pairs_file
from clip_tao.errors import DataError
from clip_tao.pas import dataset_of, evaluate_pas, exact_figures, overall


class PasValidation:
    def __init__(self, val: ValDataConfig):
        self.mode = val.metadata_match_mode
        self.rows: dict[str, dict] = {}  # sample key "<entry>/<list name>" -> its pairs row
        self.all_rows: list[dict] = []
        self.origin: dict[str, str] = {}  # sample key -> "<pairs file> row <n>", for errors
        for index, entry in enumerate(val.datasets):
            where = f"dataset.val.datasets[{index}]"
            if not entry.image_list_file:
                raise DataError(f"{where}.image_list_file is not set: metadata_match_eval joins pairs rows to it")
            names = _read_image_list(entry, where)
            accessories = True if self.mode == "scalar_plus_accessories" else None
            path = pairs_file(entry, "val", where)
            meta = load_metadata(path, names, accessories)
            for number, (name, row) in enumerate(zip(names, meta.rows)):
                self.rows[f"{index}/{name}"] = row
                self.origin[f"{index}/{name}"] = f"{path} row {number}"
            self.all_rows += meta.rows

    def figures(self, samples, embedded) -> dict[str, float]:
        """``{"pas/overall_mAP": ..., ...}`` from the validation embeddings (``Embeddings`` of ``samples``)."""
        images: dict[tuple, torch.Tensor] = {}
        texts: dict[str, torch.Tensor] = {}
        image = F.normalize(embedded.image.float(), dim=-1)
        text = F.normalize(embedded.text.float(), dim=-1)
        for position, index in enumerate(embedded.indices.tolist()):
            sample = samples[index]
            row = self.rows.get(sample.key)
            if row is None:
                continue
            if (sample.caption or "").strip() != row["caption"].strip():
                raise DataError(
                    f"{self.origin[sample.key]}: caption {row['caption']!r} differs from the caption file of "
                    f"{sample.image_path}: the pairs file is stale; write it again from the captions"
                )
            images.setdefault((dataset_of(row), row["image_path"]), image[position])
            texts.setdefault(row["caption"], text[position])
        missing = [r for r in self.all_rows if (dataset_of(r), r["image_path"]) not in images]
        if missing:
            raise DataError(
                f"metadata_match_eval: {len(missing)} pairs rows have no embedded image (e.g. {missing[0]['unique_name']}): "
                "every validation row must be readable"
            )
        figures = overall(evaluate_pas(self.all_rows, images, texts, self.mode))
        figures.update(exact_figures(self.all_rows, images, texts, self.mode))
        return {f"pas/{k}": v for k, v in figures.items()}

"""TAO 7.3's attribute metadata: ``*_pairs.json`` joined to an ``image_list_file`` by row, and its vocabularies.

TAO's data contract (its PAS layout):

- ``<split>_pairs.json`` is a JSON array; row ``k`` describes line ``k`` of ``<split>_list.txt`` (same length;
  blank list lines do not count). Fields: ``query_type``, ``caption``, ``unique_name``, ``image_path``, optional
  ``dataset``; ``image_attr_values`` / ``text_attr_values``: lists of integers, one per attribute of the
  vocabulary (a negative text value leaves the attribute unconstrained); ``image_accessory_ids`` /
  ``text_accessory_ids``: both or neither, on every row alike, IDs > 0 from the accessory vocabulary, the text's
  a subset of the image's.
- ``attribute_vocab.json`` and ``accessory_vocab.json`` sit beside the pairs file. Per attribute, every ID whose
  label reads "not visible" (case, ``_`` and spacing aside) becomes -1 in image and text vectors: the query no
  longer constrains that attribute and the image's value is unknown.
- Which file: training reads ``train_pairs_file`` only; validation and evaluate ``attribute_pairs_file``, else the
  ``<stem>_pairs.json`` beside an ``<stem>_list.txt``.
- The same ``(dataset, image_path)`` must carry the same image attributes and accessories on every row.

Every problem is one :class:`~clip_tao.errors.DataError` line naming the file, the row and the field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_tao.config.schema import DatasetEntry
from clip_tao.errors import DataError

QUERY_TYPES = ("easy", "medium", "hard", "natural_caption", "original_captions")


@dataclass
class AttributeMetadata:
    """The rows of one pairs file as tensors (accessory lists right-padded with 0 to the longest row)."""

    rows: list[dict]
    image_attr: torch.Tensor  # [N, A] long
    text_attr: torch.Tensor  # [N, A] long
    image_acc: torch.Tensor | None = None  # [N, K] long
    text_acc: torch.Tensor | None = None  # [N, K'] long
    attributes: list[str] = field(default_factory=list)


def pairs_file(entry: DatasetEntry, role: str, where: str) -> str:
    """The pairs file of a dataset entry for ``role`` ``train`` or ``val`` (also evaluate), by TAO's rule."""
    if role == "train":
        if not entry.train_pairs_file:
            raise DataError(f"{where}.train_pairs_file is not set: the attribute metadata needs the train_pairs.json")
        return entry.train_pairs_file
    if entry.attribute_pairs_file:
        return entry.attribute_pairs_file
    beside = _pairs_beside_list(entry)
    if beside is None:
        raise DataError(
            f"{where}: no attribute_pairs_file, and image_list_file {entry.image_list_file or 'null'!r} does not end "
            "in _list.txt (TAO's <stem>_list.txt -> <stem>_pairs.json): set attribute_pairs_file"
        )
    return beside


def _pairs_beside_list(entry: DatasetEntry) -> str | None:
    """TAO's ``<stem>_pairs.json`` for an ``image_list_file`` named ``<stem>_list.txt``, else ``None``."""
    listing = entry.image_list_file or ""
    return listing[: -len("_list.txt")] + "_pairs.json" if listing.endswith("_list.txt") else None


def load_metadata(path: str, list_entries: list[str], accessories: bool | None = None) -> AttributeMetadata:
    """Read and check ``path`` against the list's ``list_entries`` (in order); vocabularies from beside it.

    ``accessories``: require the accessory fields (True), ignore them (False), or take them when present (None).
    """
    rows = _read_rows(path)
    if len(rows) != len(list_entries):
        raise DataError(
            f"{path}: {len(rows)} rows but its list has {len(list_entries)} entries: TAO joins them row by row"
        )
    vocab_path = Path(path).with_name("attribute_vocab.json")
    attributes, not_visible = _attribute_vocab(str(vocab_path))
    has_acc = ["image_accessory_ids" in row or "text_accessory_ids" in row for row in rows]
    if accessories is None:
        accessories = any(has_acc)
    valid_acc = _accessory_vocab(str(Path(path).with_name("accessory_vocab.json"))) if accessories else None
    image_attr, text_attr, image_acc, text_acc = [], [], [], []
    seen: dict[tuple, tuple] = {}
    for k, row in enumerate(rows):
        where = f"{path}: row {k}"
        if not isinstance(row, dict):
            raise DataError(f"{where} is not a JSON object")
        for name in ("caption", "unique_name", "image_path"):
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where} field {name}: must be a non-empty string, got {value!r}")
        query_type = row.get("query_type", "easy")
        if not isinstance(query_type, str):
            raise DataError(f"{where} field query_type: must be a string, got {query_type!r}")
        if Path(row["unique_name"]).as_posix() != Path(list_entries[k]).as_posix():
            raise DataError(
                f"{where} field unique_name: {row['unique_name']!r} but line {k} of the list is {list_entries[k]!r} "
                "(pairs and list must be in the same order)"
            )
        image = _int_list(row, "image_attr_values", where, len(attributes))
        text = _int_list(row, "text_attr_values", where, len(attributes))
        for a, ids in not_visible.items():
            image[a] = -1 if image[a] in ids else image[a]
            text[a] = -1 if text[a] in ids else text[a]
        image_attr.append(image)
        text_attr.append(text)
        rows[k] = {**row, "image_attr_values": image, "text_attr_values": text}  # "not visible" as -1
        identity = (row.get("dataset"), row["image_path"])
        if accessories:
            if not has_acc[k] or not ("image_accessory_ids" in row and "text_accessory_ids" in row):
                raise DataError(f"{where}: image_accessory_ids and text_accessory_ids must both be on every row")
            own = _int_list(row, "image_accessory_ids", where, None)
            wanted = _int_list(row, "text_accessory_ids", where, None)
            for name, ids in (("image_accessory_ids", own), ("text_accessory_ids", wanted)):
                bad = [i for i in ids if i <= 0 or i not in valid_acc]
                if bad or len(set(ids)) != len(ids):
                    raise DataError(
                        f"{where} field {name}: {ids} must be unique IDs > 0 of accessory_vocab.json (bad: {bad})"
                    )
            if not set(wanted) <= set(own):
                raise DataError(f"{where} field text_accessory_ids: {wanted} are not all in image_accessory_ids {own}")
            image_acc.append(own)
            text_acc.append(wanted)
            described = (tuple(image), tuple(sorted(own)))
        else:
            described = (tuple(image), ())
        if seen.setdefault(identity, described) != described:
            raise DataError(
                f"{where}: image {row['image_path']!r} has other image attributes or accessories than on an earlier "
                "row: the same image must carry the same metadata"
            )
    out = AttributeMetadata(rows, torch.tensor(image_attr), torch.tensor(text_attr), attributes=attributes)
    if accessories:
        out.image_acc, out.text_acc = _padded(image_acc), _padded(text_acc)
    return out


def _read_rows(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, parse_constant=_no_constant(path))
    except FileNotFoundError:
        raise DataError(f"pairs file {path!r} does not exist: check train_pairs_file / attribute_pairs_file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: must hold a JSON array of rows, got a {type(data).__name__}")
    return data


def _no_constant(path: str):
    def refuse(name: str):
        raise DataError(f"{path}: {name} is not a valid value in a pairs file (write an integer)")

    return refuse


def _int_list(row: dict, name: str, where: str, width: int | None) -> list[int]:
    value = row.get(name)
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise DataError(f"{where} field {name}: must be a list of integers, got {value!r}")
    if width is not None and len(value) != width:
        raise DataError(f"{where} field {name}: {len(value)} values, the attribute vocabulary has {width}")
    return list(value)


def _normalised(label: str) -> str:
    return re.sub(r"\s+", " ", label.lower().replace("_", " ")).strip()


def _attribute_vocab(path: str) -> tuple[list[str], dict[int, set[int]]]:
    """The attribute names in column order, and per column the IDs labelled "not visible"."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: TAO's attribute vocabulary sits beside the pairs file")
    with open(path, encoding="utf-8") as f:
        try:
            vocab = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    attributes = vocab.get("attributes") if isinstance(vocab, dict) else None
    if (
        not isinstance(attributes, list)
        or not attributes
        or not all(isinstance(a, str) and a for a in attributes)
        or len(set(attributes)) != len(attributes)
    ):
        raise DataError(f"{path} field attributes: must be a non-empty list of distinct names")
    value_to_id = vocab.get("value_to_id") or {}
    id_to_value = vocab.get("id_to_value") or {}
    not_visible: dict[int, set[int]] = {}
    for column, attribute in enumerate(attributes):
        ids = set()
        for label, i in (value_to_id.get(attribute) or {}).items():
            if _normalised(str(label)) == "not visible" and type(i) is int:
                ids.add(i)
        labels = id_to_value.get(attribute) or {}
        pairs = enumerate(labels) if isinstance(labels, list) else ((int(k), v) for k, v in labels.items())
        ids |= {i for i, label in pairs if _normalised(str(label)) == "not visible"}
        if ids:
            not_visible[column] = ids
    return attributes, not_visible


def _accessory_vocab(path: str) -> set[int]:
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: the accessory fields need TAO's accessory vocabulary beside the pairs")
    with open(path, encoding="utf-8") as f:
        try:
            vocab = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(vocab, dict) or vocab.get("unknown_id") != 0:
        raise DataError(f"{path} field unknown_id: must be 0")
    ids = vocab.get("value_to_id")
    if not isinstance(ids, dict) or not all(type(i) is int and i >= 0 for i in ids.values()):
        raise DataError(f"{path} field value_to_id: must map labels to integers >= 0")
    return {i for i in ids.values() if i > 0}


def _padded(lists: list[list[int]]) -> torch.Tensor:
    width = max(1, *(len(x) for x in lists)) if lists else 1
    return torch.tensor([x + [0] * (width - len(x)) for x in lists], dtype=torch.long)


def sample_metadata(samples, entries: list[DatasetEntry], accessories: bool, section: str) -> dict[str, torch.Tensor]:
    """Per scanned sample (in ``samples`` order), its row's attribute tensors from the entries' train_pairs_file.

    Samples are matched to rows through their list line (``Sample.key`` = ``<entry index>/<list name>``), so files
    skipped while scanning (no caption, say) drop their rows too.
    """
    from clip_tao.data.custom import _read_image_list

    by_key: dict[str, tuple[int, int]] = {}
    tables = []
    for index, entry in enumerate(entries):
        where = f"{section}[{index}]"
        if not entry.image_list_file:
            raise DataError(f"{where}.image_list_file is not set: TAO's pairs rows are joined to its lines")
        names = _read_image_list(entry, where)
        tables.append(load_metadata(pairs_file(entry, "train", where), names, accessories))
        for row, name in enumerate(names):
            by_key[f"{index}/{name}"] = (index, row)
    width = {len(t.attributes) for t in tables}
    if len(width) != 1:
        raise DataError(f"{section}: the datasets' attribute vocabularies differ ({sorted(width)} attributes)")
    picks = [by_key[s.key] for s in samples]
    out = {
        "image_attr": torch.stack([tables[i].image_attr[r] for i, r in picks]),
        "text_attr": torch.stack([tables[i].text_attr[r] for i, r in picks]),
    }
    if accessories:
        for name in ("image_acc", "text_acc"):
            k = max(getattr(t, name).shape[1] for t in tables)
            rows = [getattr(tables[i], name)[r] for i, r in picks]
            out[name] = torch.stack([torch.nn.functional.pad(x, (0, k - len(x))) for x in rows])
    return out


def sample_query_types(samples, entries: list[DatasetEntry], section: str) -> tuple[list[str], list[str] | None]:
    """Each scanned sample's ``query_type`` from its dataset's train_pairs_file (missing: ``easy``, as TAO) and
    its row's ``caption`` (``None`` for all when a row has none: TAO's unique-caption batches need every one)."""
    from clip_tao.data.custom import _read_image_list

    by_key: dict[str, tuple[str, str | None]] = {}
    for index, entry in enumerate(entries):
        where = f"{section}[{index}]"
        if not entry.image_list_file:
            raise DataError(f"{where}.image_list_file is not set: balance_query_types joins pairs rows to its lines")
        path = pairs_file(entry, "train", where)
        names = _read_image_list(entry, where)
        rows = _read_rows(path)
        if len(rows) != len(names):
            raise DataError(
                f"{path}: {len(rows)} rows but its list has {len(names)} entries: TAO joins them row by row"
            )
        for k, (name, row) in enumerate(zip(names, rows)):
            kind = row.get("query_type", "easy") if isinstance(row, dict) else None
            if not isinstance(kind, str) or not kind:
                raise DataError(f"{path}: row {k} field query_type: must be a non-empty string, got {kind!r}")
            caption = row.get("caption")
            by_key[f"{index}/{name}"] = (kind, caption if isinstance(caption, str) else None)
    pairs = [by_key[s.key] for s in samples]
    captions = [caption for _, caption in pairs]
    return [kind for kind, _ in pairs], None if None in captions else captions


def mining_pairs_file(entry: DatasetEntry) -> str | None:
    """The pairs file whose metadata guards the mining of ``entry``: ``train_pairs_file`` (mining is for
    training), else ``attribute_pairs_file``, else a ``<stem>_pairs.json`` beside a ``<stem>_list.txt`` that
    exists (TAO's rule); ``None`` when the entry has none."""
    if entry.train_pairs_file or entry.attribute_pairs_file:
        return entry.train_pairs_file or entry.attribute_pairs_file
    beside = _pairs_beside_list(entry)
    return beside if beside and os.path.isfile(beside) else None


def metadata_guard(samples, entries: list[DatasetEntry], canonical, section: str):
    """``compatible(image, key) -> bool`` for mining, or ``None`` when no entry has attribute metadata.

    ``image`` indexes ``samples``; ``key`` is a candidate caption after ``canonical``. A caption is compatible with
    an image when a pairs row with that caption (compared after ``canonical``) has text metadata the image's row matches by TAO's rule
    (:func:`clip_tao.pas.metadata_matches`, accessories included): such a caption describes the image as far
    as the metadata can tell, so it is no negative. Images and captions without a row are never compatible.
    """
    from clip_tao.data.custom import _read_image_list
    from clip_tao.pas import metadata_matches

    image_rows: dict[str, dict] = {}  # sample key "<entry>/<list name>" -> its row
    caption_rows: dict[str, list[dict]] = {}
    for index, entry in enumerate(entries):
        path = mining_pairs_file(entry)
        if path is None:
            continue
        where = f"{section}[{index}]"
        if not entry.image_list_file:
            raise DataError(f"{where}.image_list_file is not set: the rows of {path} are joined to its lines")
        names = _read_image_list(entry, where)
        for name, row in zip(names, load_metadata(path, names).rows):
            image_rows[f"{index}/{name}"] = row
            caption_rows.setdefault(canonical(row["caption"].strip()), []).append(row)
    if not image_rows:
        return None
    rows_of_images = [image_rows.get(sample.key) for sample in samples]

    def compatible(image: int, key: str) -> bool:
        own = rows_of_images[image]
        return own is not None and any(metadata_matches(row, own, True) for row in caption_rows.get(key, ()))

    return compatible

"""TAO 7.3's attribute metadata (``*_pairs.json`` + vocabularies) read as TAO's data contract has it.

The dataset is a constructed four-row example (not NVIDIA's data) in TAO's files: list, pairs,
``attribute_vocab.json``, ``accessory_vocab.json``; the expected tensors and PAS figures were worked out by hand
from TAO 7.3's data contract and definitions.
"""

from __future__ import annotations

import json

import pytest
import torch

from clip_tao.config.schema import DatasetEntry
from clip_tao.data.pas_metadata import load_metadata, pairs_file
from clip_tao.errors import DataError
from clip_tao.metadata_losses import compatibility

NAMES = ["p0_easy.jpg", "p1_hard.jpg", "p2_medium.jpg", "p3_medium.jpg"]
ROWS = [
    {"dataset": "TOY", "query_type": "easy", "caption": "A person wearing a black top.", "unique_name": "p0_easy.jpg",
     "image_path": "images/TOY/p0.jpg", "image_attr_values": [1, 1], "text_attr_values": [1, -1],
     "image_accessory_ids": [1], "text_accessory_ids": []},
    {"dataset": "TOY", "query_type": "hard", "caption": "A person in a black top wearing a hat.",
     "unique_name": "p1_hard.jpg", "image_path": "images/TOY/p1.jpg", "image_attr_values": [1, 2],
     "text_attr_values": [1, -1], "image_accessory_ids": [1, 2], "text_accessory_ids": [2]},
    {"dataset": "TOY", "query_type": "medium", "caption": "A person in a white top.", "unique_name": "p2_medium.jpg",
     "image_path": "images/TOY/p2.jpg", "image_attr_values": [2, 3], "text_attr_values": [2, -1],
     "image_accessory_ids": [], "text_accessory_ids": []},
    {"dataset": "TOY", "query_type": "medium", "caption": "A person in a black top and blue trousers.",
     "unique_name": "p3_medium.jpg", "image_path": "images/TOY/p3.jpg", "image_attr_values": [1, 1],
     "text_attr_values": [1, 1], "image_accessory_ids": [], "text_accessory_ids": []},
]  # fmt: skip
ATTRIBUTES = {
    "attributes": ["upper color", "lower color"],
    "value_to_id": {
        "upper color": {"__missing__": 0, "black": 1, "white": 2, "not visible": 3},
        "lower color": {"__missing__": 0, "blue": 1, "red": 2, "not visible": 3},
    },
    "id_to_value": {
        "upper color": ["__missing__", "black", "white", "not visible"],
        "lower color": ["__missing__", "blue", "red", "not visible"],
    },
}
ACCESSORIES = {
    "unknown_id": 0,
    "source_splits": ["train", "val", "test"],
    "id_to_value": ["__unknown__", "backpack", "hat"],
    "value_to_id": {"__unknown__": 0, "backpack": 1, "hat": 2},
}


def _write(root, rows=ROWS, names=NAMES, attributes=ATTRIBUTES, accessories=ACCESSORIES):
    root.mkdir(parents=True, exist_ok=True)
    (root / "val_list.txt").write_text("\n".join(names) + "\n\n")  # a trailing blank line does not count
    (root / "val_pairs.json").write_text(json.dumps(rows, ensure_ascii=False))
    (root / "attribute_vocab.json").write_text(json.dumps(attributes))
    (root / "accessory_vocab.json").write_text(json.dumps(accessories))
    return root


def test_the_reference_example_loads_as_tao_reads_it(tmp_path):
    root = _write(tmp_path / "toy")
    path = pairs_file(DatasetEntry(image_dir=str(root), image_list_file=str(root / "val_list.txt")), "val", "x")
    assert path == str(root / "val_pairs.json")  # TAO's <stem>_list.txt -> <stem>_pairs.json
    meta = load_metadata(path, NAMES)
    assert meta.image_attr.tolist() == [[1, 1], [1, 2], [2, -1], [1, 1]]  # row 2's "not visible" -> -1
    assert meta.text_attr.tolist() == [[1, -1], [1, -1], [2, -1], [1, 1]]
    assert meta.image_acc.tolist() == [[1, 0], [1, 2], [0, 0], [0, 0]]
    assert meta.text_acc.tolist() == [[0], [2], [0], [0]]
    # With the masks of the loss: the notes' C_attr and C_attr+acc (image x text).
    compat = compatibility(meta.text_attr, meta.image_attr, meta.text_acc, meta.image_acc, True).T
    assert compat.int().tolist() == [[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    assert meta.image_attr.dtype == torch.long and [r["caption"] for r in meta.rows][1].endswith("hat.")


def test_not_visible_label_is_matched_loosely_and_only_that_label(tmp_path):
    attributes = json.loads(json.dumps(ATTRIBUTES))
    attributes["value_to_id"]["lower color"] = {"__missing__": 0, "blue": 1, "red": 2, "Not_Visible ": 3}
    attributes["id_to_value"]["lower color"] = ["__missing__", "blue", "red", "Not_Visible "]
    meta = load_metadata(str(_write(tmp_path / "t", attributes=attributes) / "val_pairs.json"), NAMES)
    assert meta.image_attr[2].tolist() == [2, -1] and meta.image_attr[0].tolist() == [1, 1]  # 0 stays an ID


def test_training_has_no_fallback_and_other_list_names_are_refused():
    entry = DatasetEntry(image_dir="/d", image_list_file="/d/val_list.txt")
    with pytest.raises(DataError, match=r"x\.train_pairs_file is not set"):
        pairs_file(entry, "train", "x")
    with pytest.raises(DataError, match="does not end in _list.txt"):
        pairs_file(DatasetEntry(image_dir="/d", image_list_file="/d/images.txt"), "val", "x")


def _bad(rows_change):
    rows = json.loads(json.dumps(ROWS))
    rows_change(rows)
    return rows


@pytest.mark.parametrize(
    ("rows", "names", "message"),
    [
        (ROWS[:3], NAMES, "3 rows but its list has 4 entries"),
        (_bad(lambda r: r[1].update(image_attr_values=[1, True])), NAMES, "row 1 field image_attr_values: must be a list of integers"),
        (_bad(lambda r: r[2].update(text_attr_values=[2])), NAMES, "row 2 field text_attr_values: 1 values, the attribute vocabulary has 2"),
        (_bad(lambda r: r[0].update(caption="  ")), NAMES, "row 0 field caption: must be a non-empty string"),
        (ROWS, list(reversed(NAMES)), "row 0 field unique_name: 'p0_easy.jpg' but line 0 of the list is 'p3_medium.jpg'"),
        (_bad(lambda r: r[1].update(text_accessory_ids=[7])), NAMES, "row 1 field text_accessory_ids: [7] must be unique IDs > 0"),
        (_bad(lambda r: r[0].update(text_accessory_ids=[2])), NAMES, "row 0 field text_accessory_ids: [2] are not all in"),
        (_bad(lambda r: r[3].pop("text_accessory_ids")), NAMES, "row 3: image_accessory_ids and text_accessory_ids must both"),
        (_bad(lambda r: r[3].update(image_path="images/TOY/p0.jpg")), NAMES, "row 3: image 'images/TOY/p0.jpg' has other image attributes"),
    ],
)  # fmt: skip
def test_bad_metadata_is_one_line_naming_file_row_and_field(tmp_path, rows, names, message):
    root = _write(tmp_path / "bad", rows=rows)
    with pytest.raises(DataError) as info:
        load_metadata(str(root / "val_pairs.json"), names)
    assert message in str(info.value) and str(root / "val_pairs.json") in str(info.value)
    assert "\n" not in str(info.value)


def test_a_malformed_accessory_vocabulary_is_one_line_naming_it(tmp_path):
    root = _write(tmp_path / "v")
    (root / "accessory_vocab.json").write_text('{"unknown_id": 0,')
    with pytest.raises(DataError, match=r"accessory_vocab\.json: not valid JSON") as error:
        load_metadata(str(root / "val_pairs.json"), NAMES)
    assert "\n" not in str(error.value)


def test_nan_and_non_json_are_refused(tmp_path):
    root = _write(tmp_path / "nan")
    (root / "val_pairs.json").write_text(json.dumps(ROWS).replace("[1, 2]", "[1, NaN]", 1))
    with pytest.raises(DataError, match="NaN is not a valid value in a pairs file"):
        load_metadata(str(root / "val_pairs.json"), NAMES)
    (root / "val_pairs.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="must hold a JSON array of rows"):
        load_metadata(str(root / "val_pairs.json"), NAMES)


def _pas_dataset(root, count=16, seed=0):
    """A dataset in TAO's PAS layout (images/, captions/, train_list.txt, train_pairs.json, vocabularies)."""
    import random

    from tests.conftest import make_dataset

    make_dataset(root / "images", count, seed=seed, size=48, caption_dir=root / "captions")
    rng = random.Random(seed)
    names = [f"img_{i:03d}.jpg" for i in range(count)]
    rows = []
    for name in names:
        image = [rng.randint(1, 2), rng.randint(1, 3)]  # lower colour 3 = "not visible"
        own = sorted(rng.sample([1, 2], rng.randint(0, 2)))
        rows.append({
            "dataset": "TOY", "query_type": rng.choice(["easy", "medium", "hard"]), "unique_name": name,
            "caption": (root / "captions" / name.replace(".jpg", ".txt")).read_text().strip(),
            "image_path": f"images/TOY/{name}", "image_attr_values": image,
            "text_attr_values": [image[0], rng.choice([-1, image[1]])],
            "image_accessory_ids": own, "text_accessory_ids": own[: rng.randint(0, len(own))],
        })  # fmt: skip
    (root / "train_list.txt").write_text("\n".join(names) + "\n")
    (root / "train_pairs.json").write_text(json.dumps(rows))
    (root / "attribute_vocab.json").write_text(json.dumps(ATTRIBUTES))
    (root / "accessory_vocab.json").write_text(json.dumps(ACCESSORIES))
    return root, names


@pytest.mark.parametrize(
    ("mode", "normalization"),
    [("attribute_plus_accessory_match_positive", "per_query"), ("attribute_match_ignore", "per_query")],
)
def test_masked_loss_trains_on_taos_pairs_files(tiny_spec, tmp_path, mode, normalization):
    """One full-batch step at learning rate 0: the logged loss is the masked loss of the model's embeddings of
    the dataset under TAO's mask, computed here from the files (a full batch: the order does not matter)."""
    from clip_tao.cli import main

    spec, root, names = _pas_spec(tiny_spec, tmp_path, mode, normalization, batch_size=16)
    assert main(["train", "-e", str(spec), "wandb.enable=false"]) == 0
    assert _logged_loss(tmp_path) == pytest.approx(_expected_loss(spec, root, names, mode, normalization), rel=1e-4)
    # TAO's diagnostic of the positive modes: the off-diagonal pairs its mask promotes, on this rank.
    lines = [json.loads(x) for x in (tmp_path / "results" / "train" / "status.json").read_text().splitlines()]
    kpi = next(x["kpi"] for x in lines if x["status"] == "RUNNING")
    if mode.endswith("_positive"):
        meta = load_metadata(str(root / "train_pairs.json"), names, True)
        compat = compatibility(meta.text_attr, meta.image_attr, meta.text_acc, meta.image_acc, True).T
        assert kpi["train/compatible_positive_pairs_per_rank"] == int(compat.sum()) - int(compat.diagonal().sum())
    else:
        assert "train/compatible_positive_pairs_per_rank" not in kpi


def _pas_spec(tiny_spec, tmp_path, mode, normalization, batch_size):
    root, names = _pas_dataset(tmp_path / "pas")
    entry = {"image_dir": str(root / "images"), "caption_dir": str(root / "captions"),
             "image_list_file": str(root / "train_list.txt"), "train_pairs_file": str(root / "train_pairs.json")}  # fmt: skip
    spec = tiny_spec(
        "tiny-siglip2",
        dataset={
            "train": {"batch_size": batch_size, "num_workers": 0, "datasets": [entry],
                      "include_attribute_metadata": True},
            "val": {"batch_size": 16, "num_workers": 0, "datasets": [entry]},
            "augmentation": {"scale": [1.0, 1.0], "color_jitter": [0.0, 0.1, 0.1, 0.1, 0.0], "grayscale": 0.0},
        },
        train={"num_epochs": 1, "precision": "fp32", "optim": {"vision_lr": 0.0, "text_lr": 0.0, "warmup_steps": 0},
               "siglip_loss_mask_mode": mode, "compatible_positive_normalization": normalization,
               "compatible_positive_weight": 0.5},
    )  # fmt: skip
    return spec, root, names


def test_masked_loss_under_gather_with_two_processes(tiny_spec, tmp_path):
    """Two gloo ranks of 8 under gather (texts and their metadata from both ranks, per_query counts summed): the
    ranks' mean loss is the one-process masked loss of all 16 pairs."""
    from tests.test_distributed import torchrun

    mode, normalization = "attribute_plus_accessory_match_positive", "per_query"
    spec, root, names = _pas_spec(tiny_spec, tmp_path, mode, normalization, batch_size=8)
    torchrun("-m", "clip_tao", "train", "-e", str(spec), "wandb.enable=false")
    assert _logged_loss(tmp_path) == pytest.approx(_expected_loss(spec, root, names, mode, normalization), rel=1e-4)


def _logged_loss(tmp_path) -> float:
    lines = [json.loads(x) for x in (tmp_path / "results" / "train" / "status.json").read_text().splitlines()]
    return next(x["kpi"]["train_loss"] for x in lines if x["status"] == "RUNNING")


def _expected_loss(spec, root, names, mode, normalization) -> float:
    from PIL import Image

    from clip_tao.config import load_experiment
    from clip_tao.data.transforms import build_train_transform
    from clip_tao.engine.model_setup import build_model
    from clip_tao.metadata_losses import masked_siglip_loss

    cfg = load_experiment(spec)
    model = build_model(cfg).eval()
    transform = build_train_transform(model.preprocess, cfg.dataset.augmentation)
    pixels = torch.stack([transform(Image.open(root / "images" / n).convert("RGB")) for n in names])
    captions = [(root / "captions" / n.replace(".jpg", ".txt")).read_text().strip() for n in names]
    meta = load_metadata(str(root / "train_pairs.json"), names, True)
    accessories = "accessory" in mode
    compat = compatibility(meta.text_attr, meta.image_attr, meta.text_acc, meta.image_acc, accessories).T
    assert 0 < int(compat.sum()) - 16 < 16 * 15  # some, not all, other pairs are compatible
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(model.tokenizer(captions))
        want = masked_siglip_loss(image, text, model.logit_scale, model.logit_bias, compat, mode, 0.5, normalization)
    return float(want)


# By hand from TAO's PAS definitions, text->image: (easy mAP, R1), (medium mAP, R1, Sep), (hard mAP, R1, Sep), overall
PAS_WORKED = {
    "scalar_attributes": ((1, 1), (0.541667, 0, 0.583333), (1, 1, 1), (0.770833, 0.5)),
    "scalar_plus_accessories": ((1, 1), (0.541667, 0, 0.583333), (0.333333, 0, 0.333333), (0.604167, 0.25)),
    "paired_caption": ((1, 1), (0.5, 0, 0.666667), (0.333333, 0, 0.333333), (0.583333, 0.25)),
}
FIRST_POS = {"scalar_attributes": (1, 2, 1), "scalar_plus_accessories": (1, 2, 3), "paired_caption": (1, 2, 3)}
AVG_GT = {"scalar_attributes": (3, 1.5, 3), "scalar_plus_accessories": (3, 1.5, 1), "paired_caption": (1, 1, 1)}


@pytest.mark.parametrize("mode", PAS_WORKED)
def test_pas_figures_equal_the_worked_case(tmp_path, mode):
    import csv
    import math

    from clip_tao.pas import evaluate_pas, overall, write_pas_files

    root = _write(tmp_path / "toy")
    meta = load_metadata(str(root / "val_pairs.json"), NAMES)

    def unit(degrees):
        return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])

    images = {("TOY", r["image_path"]): unit(d) for r, d in zip(meta.rows, (0, 30, 90, 10))}
    texts = {r["caption"]: unit(d) for r, d in zip(meta.rows, (4, 12, 55, 22))}
    rows = evaluate_pas(meta.rows, images, texts, mode)
    toy = {r["QueryType"]: r for r in rows if r["Dataset"] == "TOY"}
    (easy, medium, hard, total) = PAS_WORKED[mode]
    assert (toy["easy"]["mAP"], toy["easy"]["Rank-1"]) == pytest.approx(easy, abs=1e-6)
    assert (toy["medium"]["mAP"], toy["medium"]["Rank-1"], toy["medium"]["Separability"]) == pytest.approx(
        medium, abs=1e-6
    )
    assert (toy["hard"]["mAP"], toy["hard"]["Rank-1"], toy["hard"]["Separability"]) == pytest.approx(hard, abs=1e-6)
    assert tuple(toy[t]["First Pos"] for t in ("easy", "medium", "hard")) == FIRST_POS[mode]
    assert tuple(toy[t]["avg_gt_per_query"] for t in ("easy", "medium", "hard")) == AVG_GT[mode]
    assert all(toy[t]["Rank-5"] == 1 and toy[t]["Match@5"] == 1 and toy[t]["Zero@5"] == 0 for t in toy)
    kpi = overall(rows)
    assert (kpi["overall_mAP"], kpi["overall_rank1"]) == pytest.approx(total, abs=1e-6) and kpi["overall_rank5"] == 1
    # One dataset: the weighted rows equal the dataset's (First Pos left empty).
    wavg = {r["QueryType"]: r for r in rows if r["Dataset"] == "WAVG_1_DATASETS"}
    assert all(wavg[t]["mAP"] == toy[t]["mAP"] and math.isnan(wavg[t]["First Pos"]) for t in toy)
    written = write_pas_files(str(tmp_path), rows, None)
    with open(written[0], newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["Dataset", "QueryType", "EasyAttribute", "num_queries", "gallery_size",
                              "avg_gt_per_query", "mAP", "Rank-1", "Rank-5", "Separability", "Match@5", "Zero@5",
                              "First Pos"]  # fmt: skip
    assert float(table[1]["mAP"]) == pytest.approx(medium[0], abs=1e-6) and table[1]["EasyAttribute"] == ""
    with open(written[2], newline="", encoding="utf-8") as f:
        assert next(csv.DictReader(f))["First Pos"] == ""  # NaN is an empty cell


def test_evaluate_writes_taos_pas_files(tiny_spec, tmp_path):
    """Direct PAS evaluate (an evaluate.datasets entry with a pairs file): TAO's CSV files, and figures equal to
    TAO's definitions on the model's own embeddings of the gallery images and captions."""
    import csv

    from PIL import Image

    from clip_tao.cli import main
    from clip_tao.config import load_experiment
    from clip_tao.data.transforms import build_eval_transform
    from clip_tao.engine.model_setup import build_model
    from clip_tao.pas import evaluate_pas, overall

    root, names = _pas_dataset(tmp_path / "pas")
    entry = {"image_dir": str(root / "images"), "image_list_file": str(root / "train_list.txt"),
             "attribute_pairs_file": str(root / "train_pairs.json")}  # fmt: skip
    spec = tiny_spec("tiny-siglip2", evaluate={"num_workers": 0, "batch_size": 8, "datasets": [entry],
                                               "pas_ground_truth_mode": "scalar_plus_accessories"})  # fmt: skip
    assert main(["evaluate", "-e", str(spec), "wandb.enable=false"]) == 0
    out = tmp_path / "results" / "evaluate"
    stems = ("nvidia_pas_metrics", "nvidia_pas_metadata_metrics")
    for stem in stems:
        for suffix in ("", "_aggregate", "_weighted_aggregate"):
            assert (out / f"{stem}{suffix}.csv").is_file()
    with open(out / "nvidia_pas_metadata_metrics.csv", newline="", encoding="utf-8") as f:
        table = {r["QueryType"]: r for r in csv.DictReader(f)}
    results = json.loads((out / "results.json").read_text())

    cfg = load_experiment(spec)
    model = build_model(cfg).eval()
    transform = build_eval_transform(model.preprocess)
    meta = load_metadata(str(root / "train_pairs.json"), names, True)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(root / "images" / n).convert("RGB")) for n in names])
        image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        captions = [r["caption"] for r in meta.rows]
        text = torch.nn.functional.normalize(model.encode_text(model.tokenizer(captions)), dim=-1)
    images = {("TOY", r["image_path"]): v for r, v in zip(meta.rows, image)}
    want = evaluate_pas(meta.rows, images, dict(zip(captions, text)), "scalar_plus_accessories")
    for row in (r for r in want if r["Dataset"] == "TOY"):
        assert float(table[row["QueryType"]]["mAP"]) == pytest.approx(row["mAP"], abs=1e-5)
        assert int(table[row["QueryType"]]["num_queries"]) == row["num_queries"]
    assert results["pas/overall_mAP"] == pytest.approx(overall(want)["overall_mAP"], abs=1e-5)
    _assert_exact_figures_match_scikit_learn(results, meta.rows, images, dict(zip(captions, text)))


def _assert_exact_figures_match_scikit_learn(results, rows, images, texts, mode="scalar_plus_accessories"):
    """clip-tao's own figures for TAO's PAS queries (pas/<type>_t2i_*): per query with scikit-learn on the
    model's embeddings, each against its dataset's gallery, ties against the model, then averaged per type."""
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    from clip_tao.pas import queries

    galleries, qs = queries(rows, mode)
    per_type = {}
    for q in qs:
        paths = galleries[q["dataset"]]
        scores = (
            torch.stack([images[(q["dataset"], p)] for p in paths]).double() @ texts[q["caption"]].double()
        ).numpy()
        relevant = np.isin(np.arange(len(paths)), list(q["relevant"]))
        rank = 1 + int(((scores >= scores[relevant].max()) & ~relevant).sum())
        auc = roc_auc_score(relevant, scores) if not relevant.all() else np.nan
        per_type.setdefault(q["type"], []).append((rank, average_precision_score(relevant, scores), auc))
    per_type["overall"] = [v for t in ("easy", "medium", "hard") for v in per_type.get(t, [])]
    assert len(per_type) > 1
    for kind, values in per_type.items():
        ranks, aps, aucs = (np.array([v[i] for v in values]) for i in range(3))
        assert results[f"pas/{kind}_t2i_R@1"] == pytest.approx((ranks <= 1).mean() * 100, abs=1e-9)
        assert results[f"pas/{kind}_t2i_R@5"] == pytest.approx((ranks <= 5).mean() * 100, abs=1e-9)
        assert results[f"pas/{kind}_t2i_MedR"] == np.median(ranks)
        assert results[f"pas/{kind}_t2i_mAP"] == pytest.approx(aps.mean() * 100, abs=1e-4)
        assert results[f"pas/{kind}_t2i_AUC"] == pytest.approx(np.nanmean(aucs), abs=1e-6)


def test_metadata_match_validation_reports_taos_pas_kpis(tiny_spec, tmp_path):
    """dataset.val.metadata_match_eval: val/pas/* in status.json (TAO's names, fractions in strings), equal to the
    PAS figures of the (unchanged: lr 0) model; the top-k checkpointer watches val/pas/overall_mAP by default."""
    from PIL import Image

    from clip_tao.cli import main
    from clip_tao.config import load_experiment
    from clip_tao.data.transforms import build_eval_transform
    from clip_tao.engine.model_setup import build_model
    from clip_tao.pas import evaluate_pas, overall

    root, names = _pas_dataset(tmp_path / "pas")
    entry = {
        "image_dir": str(root / "images"),
        "caption_dir": str(root / "captions"),
        "image_list_file": str(root / "train_list.txt"),
    }  # pairs: train_list.txt -> train_pairs.json
    spec = tiny_spec(
        "tiny-siglip2",
        dataset={"train": {"batch_size": 8, "num_workers": 0, "datasets": [entry]},
                 "val": {"batch_size": 8, "num_workers": 0, "datasets": [entry], "metadata_match_eval": True,
                         "metadata_match_mode": "scalar_plus_accessories"}},
        train={"num_epochs": 1, "optim": {"vision_lr": 0.0, "text_lr": 0.0, "warmup_steps": 0},
               "checkpointer": {"enable_topk": True}},
    )  # fmt: skip
    assert main(["train", "-e", str(spec), "wandb.enable=false"]) == 0
    train = tmp_path / "results" / "train"
    lines = [json.loads(x) for x in (train / "status.json").read_text().splitlines()]
    kpi = next(x["kpi"] for x in lines if x["status"] == "RUNNING")
    assert "val/t2i_mAP" not in kpi  # the PAS figures replace the paired ones
    assert (train / "model_best_000.pth").is_file() and (train / "clip_best.pth").is_file()

    cfg = load_experiment(spec)
    model = build_model(cfg).eval()
    transform = build_eval_transform(model.preprocess)
    meta = load_metadata(str(root / "train_pairs.json"), names, True)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(root / "images" / n).convert("RGB")) for n in names])
        image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        captions = [r["caption"] for r in meta.rows]
        text = torch.nn.functional.normalize(model.encode_text(model.tokenizer(captions)), dim=-1)
    texts = {}
    for caption, vector in zip(captions, text):
        texts.setdefault(caption, vector)
    images = {("TOY", r["image_path"]): v for r, v in zip(meta.rows, image)}
    want = overall(evaluate_pas(meta.rows, images, texts, "scalar_plus_accessories"))
    kpi_names = [f"{k}_{figure}" for k in ("easy", "medium", "hard", "overall") for figure in ("mAP", "rank1", "rank5")]
    for name in kpi_names:
        assert isinstance(kpi[f"val/pas/{name}"], str)
        assert float(kpi[f"val/pas/{name}"]) == pytest.approx(want[name], abs=1e-5)
    # clip-tao's own exact figures for the same queries, as numbers under its own names (TAO's names are TAO's KPIs).
    _assert_exact_figures_match_scikit_learn(kpi, meta.rows, images, texts)
    assert "val/pas/overall_t2i_mAP" not in kpi
    # TAO's trainer.test route: evaluate without evaluate.datasets scores dataset.val the same way, as test/pas/*.
    assert main(["evaluate", "-e", str(spec), "wandb.enable=false"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "results" / "evaluate" / "status.json").read_text().splitlines()]
    tested = lines[-1]["kpi"]
    for name in kpi_names:
        assert float(tested[f"test/pas/{name}"]) == pytest.approx(want[name], abs=1e-5)
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    _assert_exact_figures_match_scikit_learn(results, meta.rows, images, texts)

    # A caption file edited after the pairs file was written: one line naming the image and the pairs row.
    (root / "captions" / names[3].replace(".jpg", ".txt")).write_text("a caption nobody wrote into the pairs file\n")
    assert main(["evaluate", "-e", str(spec), "wandb.enable=false"]) == 1
    last = json.loads((tmp_path / "results" / "evaluate" / "status.json").read_text().splitlines()[-1])
    assert last["status"] == "FAILURE"
    assert "train_pairs.json row 3: caption" in last["message"] and names[3] in last["message"]
    assert "the pairs file is stale" in last["message"]


def test_balanced_query_type_sampler_equalises_types_and_is_fixed_per_epoch():
    from clip_tao.data.loaders import BalancedQueryTypeSampler

    kinds = ["easy"] * 12 + ["medium"] * 3 + ["hard"]
    sampler = BalancedQueryTypeSampler(kinds, seed=42)
    drawn = []
    for epoch in range(300):
        sampler.set_epoch(epoch)
        drawn += [kinds[i] for i in sampler]
    for kind in ("easy", "medium", "hard"):  # weight 1/count: each type a third (12x rarer hard rows too)
        assert drawn.count(kind) / len(drawn) == pytest.approx(1 / 3, abs=0.03)
    sampler.set_epoch(5)
    first = list(sampler)
    assert list(sampler) == first and len(first) == 16  # an epoch's draw is fixed by the seed
    sampler.start_index = 6  # resuming after 6 samples of the epoch continues the same draw
    assert list(sampler) == first[6:] and len(sampler) == 10
    ranks = [BalancedQueryTypeSampler(kinds, seed=42, rank=r, world_size=3) for r in range(3)]
    shares = [list(r) for r in ranks]
    assert [len(s) for s in shares] == [5, 5, 5]  # equal on every rank (16 // 3)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(42))
    for r, share in enumerate(shares):  # each rank draws from its own slice of the epoch's permutation
        assert set(share) <= set(order[r * 5 : (r + 1) * 5].tolist())


def test_balanced_training_runs_on_taos_pairs_files(tiny_spec, tmp_path, capsys):
    from clip_tao.cli import main

    root, names = _pas_dataset(tmp_path / "pas")
    entry = {"image_dir": str(root / "images"), "caption_dir": str(root / "captions"),
             "image_list_file": str(root / "train_list.txt"), "train_pairs_file": str(root / "train_pairs.json")}  # fmt: skip
    log = tmp_path / "samples.txt"
    spec = tiny_spec("tiny-clip", dataset={"train": {"batch_size": 8, "num_workers": 0, "datasets": [entry],
                                                     "balance_query_types": True}},
                     train={"num_epochs": 1, "sample_log": str(log)})  # fmt: skip
    assert main(["train", "-e", str(spec), "wandb.enable=false", "dataset.train.unique_caption_per_batch=false"]) == 0
    from clip_tao.data.loaders import BalancedQueryTypeSampler

    kinds = [r["query_type"] for r in json.loads((root / "train_pairs.json").read_text())]
    sampler = BalancedQueryTypeSampler(kinds, seed=42)
    sampler.set_epoch(0)
    want = [f"0/{names[i]}" for i in sampler]
    trained = [line.split(" ", 1)[1].strip() for line in log.read_text().splitlines()]
    assert trained == want  # the batches are the sampler's draw, repeats included


def test_pas_ties_go_to_the_lower_gallery_index():
    """TAO's rule, unlike clip-tao's own figures: among equal similarities the lower gallery index ranks first."""
    from clip_tao.pas import query_metrics

    tied = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.1])
    assert query_metrics(tied, {3})["First Pos"] == 4  # behind 0.9 and the tied items 0 and 2
    assert query_metrics(tied, {0})["First Pos"] == 2
    assert query_metrics(tied, {2, 4})["AP"] == pytest.approx((1 / 3 + 2 / 5) / 2)

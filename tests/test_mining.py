"""``inference.mode: mine``: the negatives written against a direct computation, the false-negative guards,
the folder training reads, and the one-line error of a collection without captions."""

import json

import pytest
import torch
from PIL import Image

from clip_tao.cli import main
from clip_tao.models import create_model
from clip_tao.models.tokenizer import canonicalize_text
from tests.conftest import make_dataset


def _collection(tmp_path):
    """24 squares (4 colours: many images share a caption) plus twins that differ only in case/punctuation."""
    root = make_dataset(tmp_path / "mine" / "images", 24, seed=5)
    (root / "img_000.txt").write_text("A Red square, on BLUE!\n")
    (root / "img_001.txt").write_text("a red square on blue\n")
    return root


def _direct(root, captions_by_stem, k, max_similarity, canonicalize, skip=lambda stem, caption: False):
    """The top-k by loops over every (image, distinct caption) pair, from the model's own encoders; ``skip``:
    candidates a guard drops besides the image's own captions and ``max_similarity``."""
    from clip_tao.data.transforms import build_eval_transform

    canonical = canonicalize_text if canonicalize else (lambda t: t)
    model = create_model("tiny-clip", canonicalize_text=canonicalize)
    transform = build_eval_transform(model.preprocess)
    candidates = sorted({c for cs in captions_by_stem.values() for c in cs})
    with torch.no_grad():
        text = model.encode_text(model.tokenizer(candidates))
    want = {}
    for stem, own in captions_by_stem.items():
        with torch.no_grad():
            image = model.encode_image(transform(Image.open(root / f"{stem}.jpg").convert("RGB"))[None])[0]
        scored = sorted(((float(image @ t), c) for c, t in zip(candidates, text)), reverse=True)
        owned = {canonical(c) for c in own}
        picked, seen = [], set()
        for score, caption in scored:
            if canonical(caption) in owned or (max_similarity is not None and score > max_similarity):
                continue
            if skip(stem, caption):
                continue
            if canonical(caption) not in seen:
                seen.add(canonical(caption))
                picked.append((caption, score))
        want[stem] = picked[:k]
    return want


@pytest.mark.parametrize("canonicalize", [False, True])
def test_mined_negatives_follow_the_definition_and_guards(tiny_spec, tmp_path, canonicalize):
    root = _collection(tmp_path)
    captions = {p.stem: [p.read_text().strip()] for p in sorted(root.glob("*.txt"))}
    spec = tiny_spec()
    out = tmp_path / "mined"
    args = ["inference.mode=mine", f"inference.datasets=[{{image_dir: {root}}}]", "inference.mine.negatives_per_image=3",
            f"inference.mine.output_dir={out}", f"model.canonicalize_text={str(canonicalize).lower()}"]  # fmt: skip
    # A threshold that bites, far from every similarity: the CLI embeds in batches and this test one by one, so
    # their similarities differ by rounding, and a threshold at a similarity would let rounding decide.
    canonical = canonicalize_text if canonicalize else (lambda t: t)
    loose = _direct(root, captions, 100, None, canonicalize)
    scores = sorted({s for picked in loose.values() for _, s in picked})
    middle = scores[len(scores) // 4 : 3 * len(scores) // 4 + 1]
    gap, threshold = max((b - a, (a + b) / 2) for a, b in zip(middle, middle[1:]))
    assert gap > 1e-4, "no clear gap between similarities: change the data"
    assert main(["inference", "-e", str(spec), *args, f"inference.mine.max_similarity={threshold}"]) == 0
    want = _direct(root, captions, 3, threshold, canonicalize)
    for stem, own in captions.items():
        path = out / f"{stem}.txt"
        got = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        assert got == [c for c, _ in want[stem]], stem
        assert not {canonical(c) for c in got} & {canonical(c) for c in own}  # never one of its own captions
    summary = json.loads((tmp_path / "results" / "inference" / "mining_summary.json").read_text())
    assert summary["num_images"] == 24 and summary["guarded_own_caption"] > 0
    assert summary["guarded_above_max_similarity"] > 0
    if canonicalize:  # the case/punctuation twin is the other image's own caption
        assert "A Red square, on BLUE!" not in (out / "img_001.txt").read_text()


def test_mining_skips_captions_the_attribute_metadata_finds_compatible(tiny_spec, tmp_path):
    """TAO 7.3 metadata beside the images: a caption whose pairs row the image matches (every attribute the text
    names, every accessory it requires) describes the image, so it is never mined as its negative."""
    from tests.test_pas_metadata import _pas_dataset

    root, names = _pas_dataset(tmp_path / "pas", count=16, seed=3)
    rows = json.loads((root / "train_pairs.json").read_text())
    row_of = {name.removesuffix(".jpg"): row for name, row in zip(names, rows)}
    captions = {stem: [row["caption"]] for stem, row in row_of.items()}

    def visible(values):  # the vocabulary's lower colour 3 is "not visible": unknown image, unconstrained text
        return [-1 if (column == 1 and v == 3) else v for column, v in enumerate(values)]

    def compatible(stem, caption):  # TAO's rule, from the files
        image = row_of[stem]
        return any(
            all(w < 0 or w == o for w, o in zip(visible(r["text_attr_values"]), visible(image["image_attr_values"])))
            and set(r["text_accessory_ids"]) <= set(image["image_accessory_ids"])
            for r in rows
            if r["caption"] == caption
        )

    # The same list under a name that is not <stem>_list.txt: no pairs file is found beside it.
    (root / "names.txt").write_text((root / "train_list.txt").read_text())
    spec = tiny_spec()
    entry = f"{{image_dir: {root / 'images'}, caption_dir: {root / 'captions'}"
    runs = {}
    for guarded, extra in ((True, f", image_list_file: {root / 'train_list.txt'}}}"),
                           (False, f", image_list_file: {root / 'names.txt'}}}")):  # fmt: skip
        out = tmp_path / f"mined_{guarded}"
        args = ["inference.mode=mine", f"inference.datasets=[{entry}{extra}]", "inference.mine.negatives_per_image=3",
                f"inference.mine.output_dir={out}", f"inference.results_dir={tmp_path / f'run_{guarded}'}"]  # fmt: skip
        assert main(["inference", "-e", str(spec), *args]) == 0
        runs[guarded] = {stem: (out / f"{stem}.txt").read_text().splitlines() for stem in row_of}
    want = _direct(root / "images", captions, 3, None, False, skip=compatible)
    assert runs[True] == {stem: [c for c, _ in picked] for stem, picked in want.items()}
    dropped = sum(compatible(stem, c) for stem, mined in runs[False].items() for c in mined)
    assert dropped > 0, "without the pairs file some mined negatives are compatible: the guard is what drops them"
    summary = json.loads((tmp_path / "run_True" / "mining_summary.json").read_text())
    assert summary["attribute_metadata"] and summary["guarded_metadata_compatible"] >= dropped
    # Which file: train_pairs_file, else attribute_pairs_file, else the one beside <stem>_list.txt (used above).
    from clip_tao.config.schema import DatasetEntry
    from clip_tao.data.pas_metadata import mining_pairs_file

    listed = {"image_dir": str(root / "images"), "image_list_file": str(root / "train_list.txt")}
    assert (
        mining_pairs_file(DatasetEntry(**listed, train_pairs_file="t.json", attribute_pairs_file="a.json")) == "t.json"
    )
    assert mining_pairs_file(DatasetEntry(**listed, attribute_pairs_file="a.json")) == "a.json"
    assert mining_pairs_file(DatasetEntry(str(root / "images"), image_list_file=str(root / "names.txt"))) is None


def test_mined_folder_trains(tiny_spec, tmp_path):
    """The output is in the negative_caption_dir layout: training reads a negative for every image."""
    from clip_tao.config.schema import DatasetEntry
    from clip_tao.data.custom import scan_custom_datasets

    spec = tiny_spec()
    train = tmp_path / "data" / "train"
    args = [
        "inference.mode=mine",
        f"inference.datasets=[{{image_dir: {train}}}]",
        "inference.mine.negatives_per_image=2",
    ]
    assert main(["inference", "-e", str(spec), *args]) == 0
    mined = tmp_path / "results" / "inference" / "negatives"
    samples, skipped = scan_custom_datasets([DatasetEntry(str(train), negative_caption_dir=str(mined))], "train")
    assert not skipped and all(len(s.negative_captions) == 2 for s in samples)
    assert all(s.caption not in s.negative_captions for s in samples)
    overrides = [f"dataset.train.datasets=[{{image_dir: {train}, negative_caption_dir: {mined}}}]", "train.num_epochs=1",
                 "train.loss_type=clip"]  # fmt: skip
    assert main(["train", "-e", str(spec), *overrides]) == 0


def test_mining_a_collection_without_captions_is_one_line(tiny_spec, tmp_path, capsys):
    root = make_dataset(tmp_path / "bare", 4)
    for caption in root.glob("*.txt"):
        caption.unlink()
    spec = tiny_spec()
    assert (
        main(["inference", "-e", str(spec), "inference.mode=mine", f"inference.datasets=[{{image_dir: {root}}}]"]) != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert any("inference.mode=mine needs captions to mine from" in line and "missing caption" in line for line in err)

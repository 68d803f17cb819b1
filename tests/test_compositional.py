"""``evaluate.mode: pairs``: accuracy by construction (mirrored lines, ties), against the model's own
embeddings computed here, and the one-line errors of bad files."""

import json

import pytest
import torch
from PIL import Image

from clip_tao.cli import main
from clip_tao.errors import DataError
from clip_tao.models import create_model
from tests.conftest import make_dataset


def _write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")  # fmt: skip


def _pairs(tmp_path):
    images = make_dataset(tmp_path / "pairs" / "images", 6, seed=3)
    (tmp_path / "pairs" / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    lines = []
    for i in range(6):
        own = (images / f"img_{i:03d}.txt").read_text().strip()
        a, b = own, own.replace("square", "circle")
        # mirrored: the same image with true caption and foil swapped, so exactly one of the two wins
        lines.append({"image": f"images/img_{i:03d}.jpg", "positive": a, "negatives": [b], "tag": "mirror"})
        lines.append({"image": str(images / f"img_{i:03d}.jpg"), "positive": b, "negatives": [a], "tag": "mirror"})
        # a foil identical to the true caption ties: never a win
        lines.append({"image": f"images/img_{i:03d}.jpg", "positive": a, "negatives": ["a dog", a], "tag": "tie"})
        lines.append({"image": f"images/img_{i:03d}.jpg", "positive": a,
                      "negatives": ["a photo of a cat", "two red squares", b]})  # fmt: skip
    lines.append({"image": "images/broken.jpg", "positive": "x", "negatives": ["y"], "tag": "mirror"})
    path = tmp_path / "pairs" / "pairs.jsonl"
    _write_lines(path, lines[:5] + [""] + lines[5:])  # a blank line is no pair
    return path, lines


def test_pairs_accuracy_by_construction_and_by_direct_computation(tiny_spec, tmp_path, capsys):
    path, lines = _pairs(tmp_path)
    spec = tiny_spec()
    assert main(["evaluate", "-e", str(spec), "evaluate.mode=pairs", f"evaluate.pairs_file={path}"]) == 0
    out_dir = tmp_path / "results" / "evaluate"
    results = json.loads((out_dir / "results.json").read_text())
    assert results["pairs_accuracy/mirror"] == 50.0 and results["num_pairs/mirror"] == 12
    assert results["pairs_accuracy/tie"] == 0.0 and results["num_pairs/tie"] == 6
    assert results["num_pairs"] == 24 and results["skipped_files"] == {"undecodable_image": 1}
    # The figure from the model directly: cosine of each image with each caption, strict wins.
    from clip_tao.data.transforms import build_eval_transform

    model = create_model("tiny-clip")
    transform = build_eval_transform(model.preprocess)
    wins = []
    for line in lines[:-1]:
        image_path = line["image"] if line["image"].startswith("/") else str(path.parent / line["image"])
        with torch.no_grad():
            image = model.encode_image(transform(Image.open(image_path).convert("RGB"))[None])[0]
            texts = model.encode_text(model.tokenizer([line["positive"], *line["negatives"]]))
        scores = (texts @ image).tolist()
        wins.append(all(scores[0] > s for s, foil in zip(scores[1:], line["negatives"]) if foil != line["positive"])
                    and line["positive"] not in line["negatives"])  # fmt: skip
    assert results["pairs_accuracy"] == pytest.approx(100 * sum(wins) / len(wins))
    status = [json.loads(s) for s in (out_dir / "status.json").read_text().splitlines()]
    assert status[-1]["status"] == "SUCCESS" and status[-1]["kpi"]["pairs_accuracy/mirror"] == 50.0
    printed = capsys.readouterr().out
    assert "accuracy %" in printed and "mirror" in printed and "tie is not a win" in printed
    rows = (out_dir / "pairs_results.csv").read_text().splitlines()
    assert len(rows) == 25 and rows[0] == "line,image,tag,positive,win"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"image": "a.jpg", "positive": "x", "negatives": ["y"]}\n{"image": "a.jpg", "positive": \n',
         r"pairs.jsonl' line 2 is not valid JSON"),
        ('{"image": "a.jpg", "positive": "x", "negatives": []}\n', r"line 1: 'negatives' must be a list of one or more"),
        ('["a.jpg", "x", "y"]\n', r"line 1: expected an object"),
        ('\n\n', r"holds no lines"),
    ],
)  # fmt: skip
def test_bad_pairs_files_are_one_line(tmp_path, content, message):
    from clip_tao.compositional import read_pairs_file

    path = tmp_path / "pairs.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        read_pairs_file(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_pairs_file_is_named(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    assert main(["evaluate", "-e", str(spec), "evaluate.mode=pairs"]) != 0
    assert "evaluate.mode=pairs needs evaluate.pairs_file" in capsys.readouterr().err


def test_benchmark_foils_rearrange_the_captions_words():
    """The measured foils are hard by construction: the same words (or one relation word changed), never the
    true caption, and the caption's word order does not tell which shape is on top."""
    import random
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    from benchmarks.compositional import draw_scene

    rng = random.Random(1)
    firsts = set()
    for _ in range(50):
        _, caption, foils = draw_scene(rng, 32)
        assert set(foils) == {"swap-att", "swap-obj", "replace-rel"}
        for tag in ("swap-att", "swap-obj"):
            assert sorted(foils[tag].split()) == sorted(caption.split()) and foils[tag] != caption
        changed = [(a, b) for a, b in zip(caption.split(), foils["replace-rel"].split()) if a != b]
        assert sorted(changed[0]) == ["above", "below"] and len(changed) == 1
        firsts.add(caption.split()[3])
    assert firsts == {"above", "below"}

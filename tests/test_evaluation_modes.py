"""Multi-caption retrieval, zero-shot classification, search, and the pictures evaluate writes."""

import csv
import json
import math
from html.parser import HTMLParser

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from clip_tao import metrics
from clip_tao.classification import DEFAULT_TEMPLATES
from clip_tao.cli import main
from clip_tao.models import create_model
from tests.conftest import make_dataset, write_spec


def _png_ok(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
        image.verify()


def _embed_images(model, paths):
    from clip_tao.data.transforms import build_eval_transform

    transform = build_eval_transform(model.preprocess)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model.encode_image(pixels)


def test_multi_caption_retrieval_follows_the_definition(tiny_spec, tmp_path):
    spec = tiny_spec()
    val = tmp_path / "data" / "val"
    captions = {}
    for i, path in enumerate(sorted(val.glob("*.txt"))):
        lines = [f"caption {j} of image {i}" for j in range(1 + i % 3)]  # 1 to 3 captions, with blank lines
        path.write_text("\n\n".join(lines) + "\n")
        captions[path.stem] = lines
    entry = f"evaluate.datasets=[{{image_dir: {val}, multi_caption: true}}]"
    assert main(["evaluate", "-e", str(spec), entry]) == 0
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    assert results["num_images"] == 16 and results["num_texts"] == sum(len(v) for v in captions.values())
    # The same figures from the model directly.
    model = create_model("tiny-clip")
    images = _embed_images(model, sorted(val.glob("*.jpg")))
    texts, owner = [], []
    for i, stem in enumerate(sorted(captions)):
        texts += captions[stem]
        owner += [i] * len(captions[stem])
    with torch.no_grad():
        text_emb = model.encode_text(model.tokenizer(texts))
    want = metrics.retrieval_metrics(images, text_emb, owner)
    for key in ("i2t_R@1", "i2t_mAP", "i2t_MedR", "i2t_AUC", "t2i_R@5", "t2i_MeanR", "t2i_AUC"):
        assert results[key] == pytest.approx(want[key], abs=1e-6), key
    # Without multi_caption the whole file is one caption (TAO's behaviour).
    assert main(["evaluate", "-e", str(spec), f"evaluate.datasets=[{{image_dir: {val}}}]"]) == 0
    assert json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())["num_texts"] == 16


def test_repeated_captions_share_one_embedding(tmp_path):
    """A caption repeated at other batch positions, in a shorter last batch and among an image's extra
    captions is encoded once: its rows are bit-identical, so retrieval ties them exactly on every CPU."""
    from tests.retrieval_checks import evaluation_embeddings

    root = make_dataset(tmp_path / "val", 11, seed=3)
    files = sorted(root.glob("*.txt"))
    repeated = "a red square on blue"
    for i in (0, 5, 9):  # first batch, second batch, the short last batch (batches of 4, 4, 3)
        files[i].write_text(repeated + "\n")
    files[6].write_text(f"a green square\n{repeated}\nsomething else\n")
    model = create_model("tiny-clip")
    spec = write_spec(tmp_path / "spec.yaml", {
        "results_dir": str(tmp_path / "results"), "model": {"type": "tiny-clip"},
        "evaluate": {"batch_size": 4, "num_workers": 0,
                     "datasets": [{"image_dir": str(root), "multi_caption": True}]},
    })  # fmt: skip
    _, texts, owner = evaluation_embeddings(str(spec), [])
    assert owner.tolist() == [*range(11), 6, 6]
    captions = [f.read_text().splitlines()[0] for f in files] + [repeated, "something else"]
    for i in range(len(captions)):  # make_dataset repeats some captions of its own too
        for j in range(i):
            assert torch.equal(texts[i], texts[j]) == (captions[i] == captions[j]), (i, j)
    with torch.no_grad():
        alone = model.encode_text(model.tokenizer([repeated]))[0]
    torch.testing.assert_close(texts[0], alone, atol=1e-5, rtol=0)


def test_evaluate_and_train_write_valid_pictures(tiny_spec, tmp_path):
    spec = tiny_spec(train={"num_epochs": 2})
    assert main(["train", "-e", str(spec)]) == 0
    _png_ok(tmp_path / "results" / "train" / "training_curves.png")
    assert main(["evaluate", "-e", str(spec)]) == 0  # evaluate.datasets unset: dataset.val is used
    for name in ("recall_at_k.png", "rank_histogram.png"):
        _png_ok(tmp_path / "results" / "evaluate" / name)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_equals_dense_with_ties_and_several_captions(chunk):
    rng = np.random.default_rng(5)
    images = rng.integers(-1, 2, size=(30, 4)).astype(np.float32)  # exact integer similarities: many ties
    owner = np.concatenate([np.arange(25), rng.integers(0, 25, 40)])
    texts = rng.integers(-1, 2, size=(len(owner), 4)).astype(np.float32)
    dense = metrics.retrieval_metrics(images, texts, owner, chunk_size=len(owner))
    assert metrics.retrieval_metrics(images, texts, owner, chunk_size=chunk) == dense


def test_compiled_counting_kernel_gives_the_eager_figures(monkeypatch):
    rng = np.random.default_rng(1)
    images = rng.integers(-2, 3, size=(64, 8)).astype(np.float32)
    owner = np.concatenate([np.arange(64), rng.integers(0, 64, 64)])
    texts = rng.integers(-2, 3, size=(len(owner), 8)).astype(np.float32)
    assert metrics.COUNTING == "eager"
    eager = metrics.retrieval_metrics(images, texts, owner)
    monkeypatch.setattr(metrics, "COUNTING", "compiled")
    monkeypatch.setattr(metrics, "_compile_failed", False)
    compiled = metrics.retrieval_metrics(images, texts, owner, chunk_size=50)
    assert not metrics._compile_failed, "the compiled kernel did not run"
    assert compiled == eager


def test_gpu_counting_layout_gives_the_cpu_counts():
    """On a GPU a block is counted whole into one-byte masks; on the CPU in cache-sized slices of float masks.
    Both layouts run here on the CPU against a direct count, on integer scores full of ties."""
    rng = np.random.default_rng(3)
    block = torch.from_numpy(rng.integers(-3, 4, size=(37, 53)).astype(np.float32))
    block[5, 7] = math.nan  # a taken-out relevant pair compares false
    rows = torch.from_numpy(rng.integers(-3, 4, size=(37, 1)).astype(np.float32))
    columns = torch.from_numpy(rng.integers(-3, 4, size=(2, 53)).astype(np.float32))
    columns[1, :4] = math.nan  # unused caption slots
    b = block.numpy()
    want = (
        (b >= rows.numpy()).sum(1), (b > rows.numpy()).sum(1),
        np.stack([(b >= c).sum(0) for c in columns.numpy()]), np.stack([(b > c).sum(0) for c in columns.numpy()]),
    )  # fmt: skip
    layouts = {"gpu": (37, torch.bool), "cpu, 5 rows a slice": (5, torch.float32), "cpu, float64": (37, torch.float64)}
    for name, (rows_at_once, mask_dtype) in layouts.items():
        got = metrics._count_in_slices(block, rows, columns, rows_at_once, mask_dtype)
        for g, w in zip(got, want):
            assert g.dtype == torch.long and np.array_equal(g.numpy(), w), name


def _class_tree(root, per_class=4):
    for color in ("red", "green", "blue"):
        make_dataset(root / color, per_class, seed=len(color))  # captions beside images are ignored here
    return root


def test_zero_shot_classification(tiny_spec, tmp_path):
    spec = tiny_spec()
    tree = _class_tree(tmp_path / "classes")
    names = tmp_path / "names.txt"
    names.write_text("blue thing\ngreen thing\nred thing\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na {} on a table\n")
    args = [
        "evaluate.mode=classification",
        f"evaluate.datasets=[{{image_dir: {tree}}}]",
        f"evaluate.classnames_file={names}",
        f"evaluate.templates_file={templates}",
    ]
    assert main(["evaluate", "-e", str(spec), *args]) == 0
    out = tmp_path / "results" / "evaluate"
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 12 and results["num_classes"] == 3 and results["num_templates"] == 2
    # Independent computation with the same model.
    model = create_model("tiny-clip")
    paths, labels = [], []
    for label, color in enumerate(("blue", "green", "red")):
        found = sorted((tree / color).glob("*.jpg"))
        paths += found
        labels += [label] * len(found)
    with torch.no_grad():
        prompts = [
            t.replace("{}", n)
            for n in ("blue thing", "green thing", "red thing")
            for t in ("a photo of a {}.", "a {} on a table")
        ]
        per_prompt = model.encode_text(model.tokenizer(prompts)).reshape(3, 2, -1)
        classes = torch.nn.functional.normalize(per_prompt.mean(1), dim=-1)
    predicted = (_embed_images(model, paths) @ classes.T).argmax(1)
    assert results["top1"] == pytest.approx((predicted == torch.tensor(labels)).float().mean().item() * 100)
    assert results["top5"] == 100.0  # 3 classes: the true class is always in the top 5
    _png_ok(out / "confusion_matrix.png")
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["folder"] for r in rows] == ["blue", "green", "red"] and [r["images"] for r in rows] == ["4", "4", "4"]
    assert rows[0]["class_name"] == "blue thing"


def test_classification_from_a_label_list_and_bad_templates(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    tree = _class_tree(tmp_path / "classes", per_class=2)
    listing = tmp_path / "labels.txt"
    listing.write_text("red/img_000.jpg red\ngreen/img_001.jpg green\nblue/img_000.jpg blue\n")
    data = f"evaluate.datasets=[{{image_dir: {tree}, image_list_file: {listing}}}]"
    assert main(["evaluate", "-e", str(spec), "evaluate.mode=classification", data]) == 0
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    assert results["num_images"] == 3 and results["num_templates"] == len(DEFAULT_TEMPLATES)
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of something\n")
    assert (
        main(["evaluate", "-e", str(spec), "evaluate.mode=classification", data, f"evaluate.templates_file={bad}"]) == 1
    )
    assert "has no {} where the class name goes" in capsys.readouterr().err


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


@pytest.mark.parametrize("faiss_min_images", [0, 50000])
def test_search_by_text_and_image(tiny_spec, tmp_path, faiss_min_images):
    spec = tiny_spec()
    val = tmp_path / "data" / "val"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square on blue\na green square\n")
    query = sorted(val.glob("*.jpg"))[3]
    common = [
        "inference.mode=search",
        "inference.top_k=4",
        f"inference.text_file={prompts}",
        f"inference.query_images=[{query}]",
        f"inference.faiss_min_images={faiss_min_images}",
    ]
    assert main(["inference", "-e", str(spec), *common, f"inference.datasets=[{{image_dir: {val}}}]"]) == 0
    out = tmp_path / "results" / "inference"
    first = json.loads((out / "search_results.json").read_text())
    assert [q["kind"] for q in first["queries"]] == ["text", "text", "image"]
    for q in first["queries"]:
        scores = [r["score"] for r in q["results"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    image_query = first["queries"][2]["results"][0]
    assert image_query["image_path"] == str(query) and image_query["score"] == pytest.approx(1.0, abs=1e-5)
    page = _Page()
    page.feed((out / "search_results.html").read_text())
    assert "html" in page.tags and len(page.images) == 3 * 4 + 1
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    # Searching the saved embeddings gives the same answer (through FAISS when asked).
    embeddings = out / "image_embeddings.h5"
    saved = tmp_path / "collection.h5"
    saved.write_bytes(embeddings.read_bytes())
    assert main(["inference", "-e", str(spec), *common, f"inference.image_embeddings_file={saved}"]) == 0
    second = json.loads((out / "search_results.json").read_text())
    for a, b in zip(first["queries"], second["queries"]):
        assert [r["image_path"] for r in a["results"]] == [r["image_path"] for r in b["results"]]
        assert [r["score"] for r in a["results"]] == pytest.approx([r["score"] for r in b["results"]], abs=1e-5)
    assert (tmp_path / "collection.faiss").exists() == (faiss_min_images == 0)
    with h5py.File(saved) as f:
        assert f.attrs["num_images"] == 16


def test_search_refuses_mismatched_embeddings(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    assert (
        main(
            [
                "inference",
                "-e",
                str(spec),
                f"inference.text_file={prompts}",
                f"inference.datasets=[{{image_dir: {tmp_path / 'data' / 'val'}}}]",
            ]
        )
        == 0
    )
    h5 = tmp_path / "results" / "inference" / "image_embeddings.h5"
    args = [
        "inference.mode=search",
        f"inference.image_embeddings_file={h5}",
        f"inference.text_file={prompts}",
        "model.type=tiny-siglip2",
    ]
    assert main(["inference", "-e", str(spec), *args]) == 1
    assert "64-d embeddings but tiny-siglip2 makes 32-d ones" in capsys.readouterr().err

"""``clip-tao index``, search through an index, and ``inference.mode: dedup``.

Recall is checked against scikit-learn's brute-force cosine neighbours on fresh queries, not against our own
exact search; index sizes against the file FAISS writes; dedup groups against planted duplicates.
"""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from clip_tao.cli import main
from clip_tao.config.schema import IndexConfig
from clip_tao.index.dedup import find_duplicate_groups
from clip_tao.index.searcher import IndexSearcher, exact_searcher, load_index
from clip_tao.index.source import EmbeddingSource
from clip_tao.io.embeddings import write_embeddings
from clip_tao.tasks.index import build_report
from tests.conftest import write_spec


def clustered(n: int, d: int, clusters: int = 100, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres, as CLIP embeddings of a collection cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fresh_recall(searcher, collection: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """recall@10 of ``searcher`` on ``queries`` against scikit-learn's exact cosine neighbours in ``collection``."""
    finite = np.isfinite(collection).all(axis=1)
    rows = np.flatnonzero(finite & (np.abs(collection).sum(axis=1) > 0))
    truth = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(collection[rows])
    want = rows[truth.kneighbors(queries, return_distance=False)]
    _, got = searcher.search(queries, k)
    return float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got, want)]))


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """12,000 x 32 clustered embeddings in TAO's .h5, with real data's faults: NaN rows, a zero row, twins."""
    root = tmp_path_factory.mktemp("index")
    x = clustered(12_000, 32)
    x[[7, 4000]] = np.nan
    x[11] = 0.0
    x[501] = x[500]  # an exact twin
    write_embeddings(
        root / "image_embeddings.h5", "image", x, [f'images/{i:05d}, odd "name".jpg' for i in range(len(x))]
    )
    return root / "image_embeddings.h5", x


@pytest.mark.parametrize(
    ("budget", "extra", "kind"),
    [
        ("64M", [], "flat"),
        ("4M", ["index.exact_max_vectors=1000"], "hnsw"),
        ("600K", ["index.exact_max_vectors=1000"], "ivf-sq8"),
        ("300K", ["index.exact_max_vectors=1000"], "ivf-pq"),
    ],
)
def test_the_index_fits_the_budget_and_reports_its_true_recall(collection, tmp_path, budget, extra, kind, capsys):
    h5_file, x = collection
    spec = write_spec(tmp_path / "spec.yaml", {"results_dir": str(tmp_path / "results")})
    args = ["index", "-e", str(spec), f"index.embeddings_file={h5_file}", f"index.max_memory={budget}", *extra]
    assert main([*args, "index.num_queries=300"]) == 0
    assert "recall@10" in capsys.readouterr().out  # the summary table
    out = tmp_path / "results" / "index"
    report = json.loads((out / "index_report.json").read_text())
    assert report["kind"] == kind and report["num_vectors"] == 12_000 and report["dim"] == 32
    budget_bytes = {"64M": 64 << 20, "4M": 4 << 20, "600K": 600 << 10, "300K": 300 << 10}[budget]
    assert report["index_bytes"] == (out / "index.faiss").stat().st_size <= budget_bytes
    assert report["recall_at_10"] >= 0.9 and report["latency_ms"]["p99"] > 0
    if kind == "ivf-pq":  # re-ranking from the file is what makes PQ usable
        assert report["rerank_factor"] > 1 and report["recall_at_10"] > report["recall_at_10_without_rerank"]
    # The reported recall holds on queries it never saw, against scikit-learn's exact neighbours.
    searcher, _, _ = load_index(str(out / "index.faiss"))
    fresh = clustered(12_200, 32)[-200:]  # new points around the same centres
    assert fresh_recall(searcher, x, fresh) >= report["recall_at_10"] - 0.05
    # NaN and zero rows are indexed as zeros: they keep their row numbers and are found by nothing.
    _, ids = searcher.search(x[[500]], 10)
    assert not {7, 11, 4000} & set(ids[0].tolist()) and {500, 501} <= set(ids[0].tolist())


def test_npy_parts_read_in_order_memory_mapped_and_in_bounded_memory(tmp_path):
    x = clustered(100_000, 64, seed=3)
    folder = tmp_path / "emb" / "img_emb"
    folder.mkdir(parents=True)
    bounds = [0, 9000, 18000, 30000, 100_000]
    for number, (a, b) in zip([0, 1, 2, 10], zip(bounds, bounds[1:])):  # img_emb_10 comes after img_emb_2
        np.save(folder / f"img_emb_{number}.npy", x[a:b].astype(np.float16 if number == 1 else np.float32))
    source = EmbeddingSource(str(tmp_path / "emb"))
    assert (len(source), source.dim) == (100_000, 64)
    rows = np.array([99_999, 5, 9000, 5, 17_999, 30_000])
    np.testing.assert_allclose(source.rows(rows), x[rows], atol=2e-3)  # part 1 is float16
    np.testing.assert_allclose(source.read(8990, 9010), x[8990:9010], atol=2e-3)
    assert source.labels()[:2] == ["0", "1"]

    # numpy reports its allocations to tracemalloc: the peak is what the build held in Python's heap.
    settings = IndexConfig(
        embeddings_file=str(tmp_path / "emb"), index_key="IVF64,SQ8", chunk_size=4096, num_queries=200
    )
    out = tmp_path / "results" / "index"
    out.mkdir(parents=True)
    tracemalloc.start()
    build_report(settings, source, 1 << 30, str(out))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.75 * x.nbytes, f"{peak:,} bytes at the peak for a {x.nbytes:,}-byte file: it was loaded whole"
    report = json.loads((out / "index_report.json").read_text())
    assert report["index_key"] == "IVF64,SQ8" and report["train_vectors"] == 10_000


def test_bad_settings_are_one_line_errors(collection, tmp_path, capsys):
    h5_file, _ = collection
    spec = write_spec(tmp_path / "spec.yaml", {"results_dir": str(tmp_path / "results")})
    base = ["index", "-e", str(spec)]
    for overrides, message in [
        ([], "clip-tao index needs index.embeddings_file"),
        ([f"index.embeddings_file={tmp_path / 'nope.h5'}"], "does not exist"),
        ([f"index.embeddings_file={h5_file}", "index.max_memory=lots"], "is not a memory size: give bytes or a size"),
        ([f"index.embeddings_file={h5_file}", "index.max_memory=10K"], "below the smallest index"),
        ([f"index.embeddings_file={h5_file}", "index.index_key='IVF9,Nonsense'"], "FAISS cannot build it"),
    ]:
        assert main([*base, *overrides]) == 1
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error, error


def _planted(seed: int = 0):
    """300 unrelated unit vectors, then copies: 3 close ones of row 5, a twin of row 17, one 0.9-close to 40."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((300, 32))
    base /= np.linalg.norm(base, axis=1, keepdims=True)

    def near(v, cosine):
        noise = rng.standard_normal(32)
        noise -= noise @ v * v
        noise /= np.linalg.norm(noise)
        return cosine * v + np.sqrt(1 - cosine**2) * noise

    extra = [near(base[5], 0.99), near(base[5], 0.985), near(base[5], 0.98), base[17], near(base[40], 0.9)]
    x = np.vstack([base, extra, np.full((1, 32), np.nan)]).astype(np.float32)
    return x, [{5, 300, 301, 302}, {17, 303}]


@pytest.mark.parametrize("index_key", [None, "IVF8,SQ8", "HNSW16"])
def test_duplicate_groups_of_planted_vectors(tmp_path, index_key):
    x, want = _planted()
    write_embeddings(tmp_path / "e.h5", "image", x, [str(i) for i in range(len(x))])
    source = EmbeddingSource(str(tmp_path / "e.h5"))
    if index_key is None:
        searcher, margin = exact_searcher(source), 1e-4
    else:
        import faiss

        index = faiss.index_factory(32, index_key, faiss.METRIC_INNER_PRODUCT)
        index.train(source.read(0, len(x)))
        index.add(source.read(0, len(x)))
        searcher, margin = IndexSearcher(index, source), 0.05
        searcher.set_params({"nprobe": 8} if "IVF" in index_key else {"efSearch": 64})
    groups = find_duplicate_groups(searcher, source, 0.95, margin, chunk_rows=64)
    assert [set(g.rows) for g in groups] == want and [g.rows[0] for g in groups] == [5, 17]
    unit = np.nan_to_num(x)
    for g in groups:  # similarity to the group's first, exact
        np.testing.assert_allclose(g.similarity[1:], unit[g.rows[1:]] @ unit[g.rows[0]], atol=1e-5)
    assert groups[1].similarity == [1.0, pytest.approx(1.0, abs=1e-6)]


def _texture(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)


def test_dedup_and_search_through_an_index_end_to_end(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        _texture(i).save(images / f"photo_{i}.png")
    (images / "photo_3 copy.png").write_bytes((images / "photo_3.png").read_bytes())  # a byte-identical twin
    Image.open(images / "photo_6.png").save(images / "photo_6 reencoded.jpg", quality=60)
    Image.open(images / "photo_8.png").resize((80, 80)).save(images / "photo_8, resized.png")
    Image.open(images / "photo_4.png").crop((3, 2, 93, 94)).save(images / "photo_4 cropped.png")  # a few pixels off
    spec = write_spec(
        tmp_path / "spec.yaml",
        {
            "results_dir": str(tmp_path / "results"),
            "model": {"type": "tiny-clip"},
            "inference": {"datasets": [{"image_dir": str(images)}], "num_workers": 0, "batch_size": 8},
        },
    )
    assert main(["inference", "-e", str(spec)]) == 0
    h5_file = tmp_path / "results" / "inference" / "image_embeddings.h5"
    assert main(["index", "-e", str(spec), f"index.embeddings_file={h5_file}", "index.index_key=HNSW8"]) == 0
    index_file = tmp_path / "results" / "index" / "index.faiss"

    # A randomly initialised tiny model maps all images close together (cosine ~0.99), but copies closer still.
    dedup = ["inference.mode=dedup", f"inference.index_file={index_file}", "inference.dedup_threshold=0.9999"]
    assert main(["inference", "-e", str(spec), *dedup]) == 0
    out = tmp_path / "results" / "inference"
    with open(out / "duplicates.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append((Path(row["path"]).name, float(row["similarity"])))
    names = sorted(sorted(n for n, _ in members) for members in groups.values())
    assert names == [
        ["photo_3 copy.png", "photo_3.png"],
        ["photo_4 cropped.png", "photo_4.png"],
        ["photo_6 reencoded.jpg", "photo_6.png"],
        ["photo_8, resized.png", "photo_8.png"],
    ]
    with h5py.File(h5_file) as f:
        vectors = f["embeddings"][()]
        paths = [Path(p.decode()).name for p in f["image_paths"][()]]
    for members in groups.values():
        first, (other, similarity) = members[0], members[1]
        assert first[1] == 1.0
        expected = vectors[paths.index(first[0])] @ vectors[paths.index(other)]
        assert similarity == pytest.approx(expected, abs=1e-5)
    page = (out / "duplicates.html").read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 4 + 8 and "group 0 (2 images)" in page

    # Search through the index: a collection image finds itself first (through an approximate index).
    search = ["inference.mode=search", f"inference.index_file={index_file}", "inference.top_k=3"]
    assert main(["inference", "-e", str(spec), *search, f"inference.query_images=[{images / 'photo_1.png'}]"]) == 0
    results = json.loads((out / "search_results.json").read_text())["queries"][0]["results"]
    assert Path(results[0]["image_path"]).name == "photo_1.png" and results[0]["score"] == pytest.approx(1, abs=1e-4)
    assert len(results) == 3
    capsys.readouterr()


def test_image_embedding_file_faults_are_named(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["vectors"] = np.zeros((3, 4))
    from clip_tao.errors import DataError

    with pytest.raises(DataError, match="has no 'embeddings' dataset"):
        EmbeddingSource(str(bad))
    (tmp_path / "text.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="is not an HDF5 file"):
        EmbeddingSource(str(tmp_path / "text.h5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .npy files"):
        EmbeddingSource(str(tmp_path / "empty"))

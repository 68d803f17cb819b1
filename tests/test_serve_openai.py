"""``clip-tao serve``'s OpenAI embeddings API, driven by the unmodified ``openai`` client against a real server.

Embeddings are checked against the PyTorch model, token counts against open_clip's own tokenizer, and the
base64 form is decoded by the client itself (its default request) and by numpy from OpenAI's published layout
(little-endian float32).
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import open_clip
import openai
import pytest
import torch
from PIL import Image

from clip_tao.cli import main
from clip_tao.data.transforms import build_eval_transform
from clip_tao.io.embeddings import write_embeddings
from clip_tao.models import create_model
from tests.conftest import make_dataset, write_spec
from tests.serve_helpers import ServerProcess

MAX_BATCH = 8
ATOL = 1e-5
NAME = "nvidia/nvclip"


@pytest.fixture(scope="module")
def reference():
    return create_model("tiny-clip").eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory, reference):
    """A PyTorch server whose /search goes through an HNSW index built by clip-tao index."""
    root = tmp_path_factory.mktemp("serve_openai")
    images = make_dataset(root / "images", 12, seed=5)
    paths = sorted(str(p) for p in images.glob("*.jpg"))
    write_embeddings(
        root / "image_embeddings.h5", "image", _images(reference, [Path(p).read_bytes() for p in paths]), paths
    )
    index_spec = write_spec(root / "index.yaml", {"results_dir": str(root / "results")})
    assert (
        main(
            [
                "index",
                "-e",
                str(index_spec),
                f"index.embeddings_file={root / 'image_embeddings.h5'}",
                "index.index_key=HNSW8",
            ]
        )
        == 0
    )
    spec = write_spec(
        root / "spec.yaml",
        {
            "results_dir": str(root / "results"),
            "model": {"type": "tiny-clip"},
            "serve": {
                "served_model_name": NAME,
                "max_batch_size": MAX_BATCH,
                "max_queue_delay_ms": 20,
                "max_request_mb": 1,
                "image_embeddings_file": str(root / "image_embeddings.h5"),
                "index_file": str(root / "results" / "index" / "index.faiss"),
            },
        },
    )
    process = ServerProcess(spec, [], root / "server.log")
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=60) as c:
        yield c


def _encoded(color, size=(90, 60), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def _data_url(data: bytes, fmt: str = "png") -> str:
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


@torch.no_grad()
def _texts(model, texts) -> np.ndarray:
    return model.encode_text(model.tokenizer(list(texts))).numpy()


@torch.no_grad()
def _images(model, encoded) -> np.ndarray:
    transform = build_eval_transform(model.preprocess)
    pixels = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded])
    return model.encode_image(pixels).numpy()


def test_models_are_listed_and_retrieved(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("text-embedding-3-small")


def test_texts_and_images_in_one_request_match_pytorch(client, reference):
    red, blue = _encoded((200, 30, 30)), _encoded((30, 30, 200), (40, 120), "JPEG")
    texts = ["a red square on blue", "ünïcode ✓ text", "x" * 2000]  # the last is cut to the context length
    inputs = [texts[0], _data_url(red), texts[1], _data_url(blue, "jpeg"), texts[2]]
    # No encoding_format: the client asks for base64 and decodes it itself.
    answer = client.embeddings.create(model=NAME, input=inputs)
    assert answer.model == NAME and answer.object == "list"
    assert [d.index for d in answer.data] == list(range(5)) and {d.object for d in answer.data} == {"embedding"}
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    want_texts, want_images = _texts(reference, texts), _images(reference, [red, blue])
    np.testing.assert_allclose(got[[0, 2, 4]], want_texts, atol=ATOL)
    np.testing.assert_allclose(got[[1, 3]], want_images, atol=ATOL)
    # Usage: the texts' tokens as open_clip's own tokenizer makes them (padding is id 0), images count none.
    ids = open_clip.tokenize(texts, context_length=reference.tokenizer.context_length)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == int((ids != 0).sum())

    floats = client.embeddings.create(model=NAME, input=inputs, encoding_format="float")
    np.testing.assert_array_equal(np.array([d.embedding for d in floats.data], dtype=np.float32), got)
    # One string works too.
    one = client.embeddings.create(model=NAME, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, want_texts[0], atol=ATOL)


def test_base64_is_little_endian_float32_as_openai_documents(server, reference):
    body = {"model": NAME, "input": ["two dogs", "a cat"], "encoding_format": "base64"}
    answer = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in answer["data"]])
    np.testing.assert_allclose(decoded, _texts(reference, ["two dogs", "a cat"]), atol=ATOL)
    # NVIDIA's retriever NIMs' "modality": plain base64 (no data: URL) is an image when marked as one.
    green = _encoded((40, 170, 60))
    body = {"model": NAME, "input": [base64.b64encode(green).decode()], "modality": "image"}
    answer = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()
    np.testing.assert_allclose(answer["data"][0]["embedding"], _images(reference, [green])[0], atol=ATOL)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server, reference):
    cases = [
        (dict(model="text-embedding-3-small", input="x"), openai.NotFoundError, "does not exist"),
        (dict(model=NAME, input=[]), openai.BadRequestError, "non-empty list"),
        (dict(model=NAME, input=""), openai.BadRequestError, "input[0] is an empty string"),
        (dict(model=NAME, input=[[1, 2, 3]]), openai.BadRequestError, "input[0] is token ids"),
        (dict(model=NAME, input=["ok", "data:image/png;base64,@@@"]), openai.BadRequestError, "input[1] is not valid base64"),
        (dict(model=NAME, input=["data:image/png;asset_id,1234"]), openai.BadRequestError, "NVCF asset ids"),
        (dict(model=NAME, input=[_data_url(b"not an image")]), openai.BadRequestError, "input[0]: not a decodable image"),
        (dict(model=NAME, input=[_data_url(_encoded("red")[:40])]), openai.BadRequestError, "not a decodable image"),
        (dict(model=NAME, input=["x"] * (MAX_BATCH + 1)), openai.BadRequestError, "max_batch_size 8"),
        (dict(model=NAME, input="x", dimensions=7), openai.BadRequestError, '"dimensions" must be'),
        (dict(model=NAME, input="x", encoding_format="int8"), openai.BadRequestError, '"encoding_format"'),
        # A 1.4 MB image on a server that takes at most 1 MB bodies.
        (dict(model=NAME, input=[_data_url(bytes(1_000_000))]), openai.APIStatusError, "larger than the server's limit"),
    ]  # fmt: skip
    for kwargs, error_type, message in cases:
        with pytest.raises(error_type) as info:
            client.embeddings.create(**kwargs)
        assert message in info.value.message, (kwargs.get("input", "")[:2], info.value.message)
        assert 400 <= info.value.status_code < 500
    assert info.value.status_code == 413
    for body, message in [(b"{not json", "not valid JSON"), (b"[1]", "must be a JSON object"), (b"{}", '"model"')]:
        response = httpx.post(f"{server.url}/v1/embeddings", content=body, timeout=60)
        error = response.json()["error"]
        assert response.status_code == 400 and message in error["message"] and error["type"], response.text
    response = httpx.get(f"{server.url}/v1/nothing-here", timeout=60)
    assert response.status_code == 404 and "no such endpoint" in response.json()["error"]["message"]
    # Still serving, and still right.
    answer = client.embeddings.create(model=NAME, input=["still here"])
    np.testing.assert_allclose(answer.data[0].embedding, _texts(reference, ["still here"])[0], atol=ATOL)


def test_concurrent_clients_share_model_calls(server, reference):
    texts = [f"photo number {i} of a {c} square" for i, c in enumerate(["red", "green", "blue", "white"] * 4)]
    expected = dict(zip(texts, _texts(reference, texts)))

    def stats():
        (s,) = httpx.get(f"{server.url}/v2/models/clip_text/stats", timeout=60).json()["model_stats"]
        return s["inference_count"], s["execution_count"]

    items_before, calls_before = stats()

    def run_client(seed: int) -> int:
        rng = np.random.default_rng(seed)
        good = 0
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
            for _ in range(12):
                chosen = [texts[int(i)] for i in rng.integers(0, len(texts), int(rng.integers(1, 3)))]
                got = np.array([d.embedding for d in c.embeddings.create(model=NAME, input=chosen).data])
                good += int(np.allclose(got, np.stack([expected[t] for t in chosen]), atol=ATOL))
        return good

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(run_client, range(8))) == 96  # every request answered with its own rows
    items_after, calls_after = stats()
    assert items_after - items_before >= 96
    assert calls_after - calls_before < 96  # concurrent requests were batched together


def test_search_goes_through_the_index(server, reference):
    import h5py

    with h5py.File(Path(server.log_file).parent / "image_embeddings.h5") as f:
        collection, paths = f["embeddings"][()], [p.decode() for p in f["image_paths"][()]]
    query = _texts(reference, ["a blue square on red"])[0]
    want = np.argsort(-(collection @ query), kind="stable")[:3]
    results = httpx.post(f"{server.url}/search", json={"text": "a blue square on red", "k": 3}, timeout=60).json()
    assert [r["image_path"] for r in results["results"]] == [paths[i] for i in want]
    np.testing.assert_allclose([r["score"] for r in results["results"]], (collection @ query)[want], atol=ATOL)
    assert "through" in server.log() and "HNSW8" in server.log()

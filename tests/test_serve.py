"""``clip-tao serve``: a real server process on 127.0.0.1, driven by an unmodified ``tritonclient.http`` client,
plain HTTP (httpx) and a headless Chromium; the embeddings it returns are checked against the PyTorch model."""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from clip_tao.data.transforms import build_eval_transform
from clip_tao.deploy.onnx_export import export_onnx
from clip_tao.io.embeddings import write_embeddings
from clip_tao.models import create_model
from tests.conftest import make_dataset, write_spec
from tests.serve_helpers import ServerProcess

MAX_BATCH = 8
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    """The PyTorch model the served ONNX files were exported from (tiny-clip's fixed initialisation)."""
    return create_model("tiny-clip").eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory, reference):
    """An ONNX Runtime server (exported tiny-clip, separate files) with a collection of 12 images."""
    root = tmp_path_factory.mktemp("serve")
    export_onnx(reference, str(root / "export" / "clip.onnx"), encoder_type="separate")
    images = make_dataset(root / "images", 12, seed=3)
    paths = sorted(str(p) for p in images.glob("*.jpg"))
    transform = build_eval_transform(reference.preprocess)
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        write_embeddings(root / "image_embeddings.h5", "image", reference.encode_image(pixels).numpy(), paths)
    spec = write_spec(
        root / "spec.yaml",
        {
            "results_dir": str(root / "results"),
            "model": {"type": "tiny-clip"},
            "serve": {
                "onnx_file": str(root / "export" / "clip_vision.onnx"),
                "image_embeddings_file": str(root / "image_embeddings.h5"),
                "faiss_min_images": 10,  # the 12 images are searched through a FAISS index
                "max_batch_size": MAX_BATCH,
                "max_queue_delay_ms": 20,
                "max_request_mb": 1,
            },
        },
    )
    server = ServerProcess(spec, [], root / "server.log")
    server.wait_ready()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def client(served):
    c = triton.InferenceServerClient(f"127.0.0.1:{served.port}")
    yield c
    c.close()


def _text_input(texts, binary=True, shape=None):
    tensor = triton.InferInput("text", shape or [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape or [len(texts), 1]), binary_data=binary)
    return tensor


def _encoded(color, size=(90, 60), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


@torch.no_grad()
def _expected_text(model, texts) -> np.ndarray:
    return model.encode_text(model.tokenizer(list(texts))).numpy()


@torch.no_grad()
def _expected_images(model, encoded: list[bytes]) -> np.ndarray:
    transform = build_eval_transform(model.preprocess)
    pixels = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded])
    return model.encode_image(pixels).numpy()


def test_health_and_metadata_through_tritonclient(client, reference):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("clip_image") and client.is_model_ready("clip_text", model_version="1")
    image = client.get_model_metadata("clip_image")
    assert [(t["name"], t["datatype"], t["shape"]) for t in image["inputs"]] == [
        ("image", "FP32", [-1, 3, 64, 64]),
        ("image_bytes", "BYTES", [-1, 1]),
    ]
    assert image["outputs"] == [{"name": "image_embedding", "datatype": "FP32", "shape": [-1, reference.embed_dim]}]
    text = client.get_model_metadata("clip_text")
    assert [t["name"] for t in text["inputs"]] == ["text"] and text["outputs"][0]["name"] == "text_embedding"
    assert client.get_model_config("clip_text")["max_batch_size"] == MAX_BATCH
    with pytest.raises(InferenceServerException, match="no model 'clip'"):
        client.get_model_metadata("clip")


@pytest.mark.parametrize("binary", [True, False])
def test_text_and_images_through_tritonclient_match_pytorch(client, reference, binary):
    texts = ["a red square on blue", "two dogs", "ünïcode text ✓"]
    output = [triton.InferRequestedOutput("text_embedding", binary_data=binary)]
    got = client.infer("clip_text", [_text_input(texts, binary)], outputs=output).as_numpy("text_embedding")
    np.testing.assert_allclose(got, _expected_text(reference, texts), atol=ATOL)
    # A flat [B] BYTES tensor works too.
    flat = client.infer("clip_text", [_text_input(texts[:1], binary, shape=[1])]).as_numpy("text_embedding")
    np.testing.assert_allclose(flat, got[:1], atol=ATOL)

    pixels = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    tensor = triton.InferInput("image", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    got = client.infer("clip_image", [tensor]).as_numpy("image_embedding")
    with torch.no_grad():
        np.testing.assert_allclose(got, reference.encode_image(torch.from_numpy(pixels)).numpy(), atol=ATOL)

    encoded = [_encoded((200, 30, 30)), _encoded((30, 30, 200), (40, 120), "JPEG")]
    tensor = triton.InferInput("image_bytes", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=object).reshape(2, 1), binary_data=True)
    got = client.infer("clip_image", [tensor], request_compression_algorithm="gzip").as_numpy("image_embedding")
    np.testing.assert_allclose(got, _expected_images(reference, encoded), atol=ATOL)


def _infer_error(client, model, tensor) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [tensor])
    return info.value


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(client, served, reference):
    def tensor(name, datatype, array):
        t = triton.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    cases = [
        ("clip_image", tensor("image", "FP32", np.zeros((1, 3, 32, 32), np.float32)), "400", "shape [batch, 3, 64, 64]"),
        ("clip_image", tensor("image", "FP64", np.zeros((1, 3, 64, 64))), "400", "must be FP32, got FP64"),
        ("clip_image", tensor("image_bytes", "BYTES", np.array([b"not an image"], dtype=object)), "400", "element 0: not a decodable image"),
        ("clip_image", tensor("image_bytes", "BYTES", np.array([_encoded("red")[:40]], dtype=object)), "400", "not a decodable image"),
        ("clip_image", tensor("pixels", "FP32", np.zeros((1, 3, 64, 64), np.float32)), "400", "has no input 'pixels'"),
        ("clip_text", tensor("text", "BYTES", np.array([b"\xff\xfe"], dtype=object)), "400", "not UTF-8"),
        ("clip_text", tensor("text", "BYTES", np.array([b"x"] * (MAX_BATCH + 1), dtype=object)), "400", "max_batch_size 8"),
        ("clip_txt", tensor("text", "BYTES", np.array([b"x"], dtype=object)), "404", "no model 'clip_txt'"),
        # 300 x 300 x 3 float32 = 1.08 MB, over the 1 MB limit of this server.
        ("clip_image", tensor("image", "FP32", np.zeros((1, 3, 300, 300), np.float32)), "413", "larger than the server's limit"),
    ]  # fmt: skip
    for model, t, status, message in cases:
        error = _infer_error(client, model, t)
        assert error.status() == status and message in error.message(), (model, error)
        assert "\n" not in error.message()

    raw = [
        ({}, b"{not json", 400, "not valid JSON"),
        ({}, b'{"inputs": []}', 400, 'non-empty "inputs"'),
        (
            {"Inference-Header-Content-Length": "85"},
            b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}',
            400,
            "",
        ),
        (
            {},
            b'{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["one"]}]}',
            400,
            "needs 2 elements",
        ),
    ]
    # A small gzip body that would inflate past the limit (a compression bomb) is refused while inflating.
    bomb = gzip.compress(b'{"inputs": [' + b" " * (3 * 2**20) + b"]}")
    raw.append(({"Content-Encoding": "gzip"}, bomb, 413, "inflated request body is larger"))
    raw.append(({"Content-Encoding": "br"}, b"{}", 415, "use gzip, deflate or none"))
    for headers, body, status, message in raw:
        response = httpx.post(f"{served.url}/v2/models/clip_text/infer", content=body, headers=headers)
        assert response.status_code == status and message in response.json()["error"], response.text
    # Still serving, and still right.
    got = client.infer("clip_text", [_text_input(["still here"])]).as_numpy("text_embedding")
    np.testing.assert_allclose(got, _expected_text(reference, ["still here"]), atol=ATOL)


def test_embed_and_search_endpoints(served, client, reference):
    encoded = _encoded((40, 170, 60))
    response = httpx.post(
        f"{served.url}/embed", json={"texts": ["a green square"], "images": [base64.b64encode(encoded).decode()]}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["dim"] == reference.embed_dim
    np.testing.assert_allclose(answer["text_embeddings"], _expected_text(reference, ["a green square"]), atol=ATOL)
    np.testing.assert_allclose(answer["image_embeddings"], _expected_images(reference, [encoded]), atol=ATOL)

    with h5py.File(Path(served.log_file).parent / "image_embeddings.h5") as f:
        collection = f["embeddings"][()]
        paths = [p.decode() for p in f["image_paths"][()]]
    query = _expected_text(reference, ["a red square on yellow"])[0]
    want = np.argsort(-(collection @ query), kind="stable")[:4]
    # The order is the data's, not rounding's: the server's query embedding is within ATOL of this one a
    # component, which moves a score by at most sqrt(D) ATOL (plus FAISS's own rounding); neighbours in the
    # top 5, and image 5 against every other image, lie further apart than twice that.
    moved = np.sqrt(len(query)) * ATOL + 1e-6
    assert -np.diff(np.sort(collection @ query)[::-1][:5]).max() > 2 * moved
    assert np.delete(collection @ collection[5], 5).max() < collection[5] @ collection[5] - 2 * moved
    response = httpx.post(f"{served.url}/search", json={"text": "a red square on yellow", "k": 4})
    results = response.json()["results"]
    assert [r["index"] for r in results] == want.tolist()
    assert [r["image_path"] for r in results] == [paths[i] for i in want]
    np.testing.assert_allclose([r["score"] for r in results], (collection @ query)[want], atol=ATOL)
    # Image query: an image of the collection finds itself first.
    own = base64.b64encode(Path(paths[5]).read_bytes()).decode()
    first = httpx.post(f"{served.url}/search", json={"image": f"data:image/jpeg;base64,{own}", "k": 1}).json()
    assert first["results"][0]["index"] == 5 and first["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    thumbnail = httpx.get(served.url + results[0]["thumbnail"])
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == Image.open(paths[want[0]]).size  # 64 px < 192 px

    # Clients name no files: a path is just a string that is not an image.
    for body, status, message in [
        ({"image": "/etc/passwd"}, 400, "not valid base64"),
        ({"image": base64.b64encode(b"/etc/passwd").decode()}, 400, "not a decodable image"),
        ({"text": "x", "k": 0}, 400, '"k" must be an integer'),
        ({"text": "x", "image": "eA=="}, 400, "give one query"),
        ({"texts": "not a list"}, 400, '"texts" must be a list'),
    ]:
        url = f"{served.url}/embed" if "texts" in body else f"{served.url}/search"
        response = httpx.post(url, json=body)
        assert response.status_code == status and message in response.json()["error"], response.text
    assert httpx.get(f"{served.url}/collection/99/thumbnail").status_code == 404
    assert httpx.get(f"{served.url}/collection/..%2F..%2Fetc%2Fpasswd/thumbnail").status_code in (404, 422)


def test_taken_port_and_bad_settings_are_one_line_errors(tmp_path, capsys):
    from clip_tao.cli import main

    spec = write_spec(
        tmp_path / "spec.yaml", {"results_dir": str(tmp_path / "results"), "model": {"type": "tiny-clip"}}
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "-e", str(spec), f"serve.port={taken.getsockname()[1]}"]) == 1
    error = capsys.readouterr().err.strip()
    assert (
        error.startswith("clip-tao serve: error: serve: cannot listen on 127.0.0.1:")
        and "choose another serve.port" in error
    )
    assert main(["serve", "-e", str(spec), "serve.max_batch_size=0"]) == 1
    assert capsys.readouterr().err.strip() == "clip-tao serve: error: serve.max_batch_size=0 must be >= 1"


def _stats(client, model):
    (stats,) = client.get_inference_statistics(model)["model_stats"]
    return stats["inference_count"], stats["execution_count"], stats["batch_stats"]


def test_load_2000_requests_from_16_clients_lose_none_and_are_batched(served, reference):
    texts = [
        f"query number {i}: a photo of a {c} square" for i, c in enumerate(["red", "green", "blue", "yellow"] * 10)
    ]
    expected = dict(zip(texts, _expected_text(reference, texts)))
    requests_per_client, clients = 125, 16
    probe = triton.InferenceServerClient(f"127.0.0.1:{served.port}")
    before, executions_before, _ = _stats(probe, "clip_text")

    def run_client(seed: int) -> int:
        c = triton.InferenceServerClient(f"127.0.0.1:{served.port}", connection_timeout=60, network_timeout=60)
        rng = np.random.default_rng(seed)
        good = 0
        for _ in range(requests_per_client):
            n = int(rng.integers(1, 3))
            chosen = [texts[int(i)] for i in rng.integers(0, len(texts), n)]
            got = c.infer("clip_text", [_text_input(chosen)]).as_numpy("text_embedding")
            want = np.stack([expected[t] for t in chosen])
            good += int(got.shape == want.shape and np.allclose(got, want, atol=ATOL))
        c.close()
        return good

    with ThreadPoolExecutor(clients) as pool:
        answered = sum(pool.map(run_client, range(clients)))
    assert answered == requests_per_client * clients  # every request answered, with its own rows
    after, executions_after, batch_stats = _stats(probe, "clip_text")
    assert {m["name"] for m in probe.get_inference_statistics()["model_stats"]} == {"clip_image", "clip_text"}
    probe.close()
    requests = requests_per_client * clients
    assert after - before >= requests  # items: 1-2 texts a request
    assert executions_after - executions_before < requests  # concurrent requests shared model calls
    assert max(b["batch_size"] for b in batch_stats) <= MAX_BATCH


def test_sigterm_finishes_requests_in_flight(tmp_path, reference):
    """PyTorch backend; a long queue delay keeps a request in flight while SIGTERM arrives."""
    spec = write_spec(
        tmp_path / "spec.yaml",
        {
            "results_dir": str(tmp_path / "results"),
            "model": {"type": "tiny-clip"},
            "serve": {"max_queue_delay_ms": 2000},
        },
    )
    server = ServerProcess(spec, [], tmp_path / "server.log")
    server.wait_ready()
    result = {}

    def request():
        body = {"texts": ["in flight"]}
        result["response"] = httpx.post(f"{server.url}/embed", json=body, timeout=30)

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(0.7)  # the request now waits in the batcher's queue
    started = time.monotonic()
    assert server.stop() == 0, server.log()
    thread.join(30)
    response = result["response"]
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["text_embeddings"], _expected_text(reference, ["in flight"]), atol=ATOL)
    assert time.monotonic() - started < 30
    status = [json.loads(line) for line in (tmp_path / "results" / "serve" / "status.json").read_text().splitlines()]
    assert status[-1]["status"] == "SUCCESS" and status[-1]["kpi"]["clip_text_requests"] == 1


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="no chromium + chromedriver (apt-get install chromium chromium-driver)")
def test_search_page_in_headless_chromium(served):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(served.url + "/")
        assert driver.title == "clip-tao search"
        driver.find_element(By.ID, "text").send_keys("a blue square on green")
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("3")
        driver.find_element(By.ID, "search").click()
        loaded = "return [...document.querySelectorAll('figure.result img')].map(i => i.complete && i.naturalWidth)"
        widths = WebDriverWait(driver, 30).until(lambda d: (w := d.execute_script(loaded)) and all(w) and w)
        assert len(widths) == 3 and all(w > 0 for w in widths)
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "figure.result figcaption")]
    finally:
        driver.quit()
    want = httpx.post(f"{served.url}/search", json={"text": "a blue square on green", "k": 3}).json()["results"]
    assert [c.split()[-1] for c in captions] == [r["image_path"] for r in want]

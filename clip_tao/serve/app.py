"""The HTTP application: Triton's inference protocol, plain JSON endpoints and a small search page.

KServe v2 / Triton: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/1]``,
``.../ready``, ``.../config``, ``.../stats``, ``POST .../infer`` for ``clip_image`` and ``clip_text``.
OpenAI / NV-CLIP NIM: ``POST /v1/embeddings``, ``GET /v1/models[/{id}]``, ``GET /v1/health/{live,ready}``.
For people: ``POST /embed``, ``POST /search``, ``GET /collection/{index}/thumbnail`` and ``GET /``.

Errors are ``{"error": "one line"}`` with a 4xx status (Triton's form, which ``tritonclient`` reports);
under ``/v1/`` they take OpenAI's form ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``;
the server keeps serving after any of them. Clients never name files: images arrive as bytes, and
thumbnails are addressed by their row in the collection loaded at start.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from clip_tao import __version__
from clip_tao.serve.batching import DynamicBatcher
from clip_tao.serve.models import IMAGE_MODEL, IMAGE_OUTPUT, TEXT_MODEL, TEXT_OUTPUT, check_request, served_models
from clip_tao.serve.openai_api import (
    OpenAIRequestError,
    count_tokens,
    embeddings_response,
    error_body,
    model_card,
    parse_embeddings_request,
)
from clip_tao.serve.protocol import ProtocolError, encode_infer_response, parse_infer_request
from clip_tao.serve.service import Collection, Embedder, ImageDecodeError

log = logging.getLogger(__name__)


class ClientError(Exception):
    """Answered as ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ServeLimits:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    dynamic_batching: bool = True
    max_request_bytes: int = 16 * 2**20
    max_top_k: int = 100


def create_app(
    embedder: Embedder, limits: ServeLimits, collection: Collection | None = None, served_name: str | None = None
) -> FastAPI:
    """``served_name``: the model id of the OpenAI endpoints (default: the model type)."""
    models = served_models(embedder.image_size, embedder.embed_dim)
    served_name = served_name or embedder.model_type
    started = int(time.time())
    batchers = {
        IMAGE_MODEL: DynamicBatcher(
            embedder.embed_images, limits.max_batch_size, limits.max_queue_delay_ms, limits.dynamic_batching,
            name=IMAGE_MODEL,
        ),
        TEXT_MODEL: DynamicBatcher(
            embedder.embed_texts, limits.max_batch_size, limits.max_queue_delay_ms, limits.dynamic_batching,
            name=TEXT_MODEL,
        ),
    }  # fmt: skip
    state = {"ready": False, "last_inference_ms": {name: 0 for name in models}}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for batcher in batchers.values():
            await batcher.start()
        state["ready"] = True
        yield
        # Uvicorn has stopped accepting and let in-flight requests finish; drain what is still queued.
        state["ready"] = False
        for batcher in batchers.values():
            await batcher.stop()

    app = FastAPI(title="clip-tao serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batchers = batchers

    def error(request: Request, message: str, status: int, param: str | None = None) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            return JSONResponse(error_body(message, status, param), status_code=status)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError):
        return error(request, str(exc), exc.status)

    @app.exception_handler(OpenAIRequestError)
    async def openai_error(request: Request, exc: OpenAIRequestError):
        return error(request, str(exc), exc.status, exc.param)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error(request, f"no such endpoint: {request.method} {request.url.path}", 404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return error(request, f"{request.method} is not allowed on {request.url.path}", 405)

    async def read_body(request: Request) -> bytes:
        """The body, at most ``max_request_bytes``; 413 beyond (after draining a little, so the client hears it)."""
        limit = limits.max_request_bytes
        too_large = ClientError(f"the request body is larger than the server's limit of {limit:,} bytes", 413)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > 8 * limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise too_large
        return b"".join(chunks)

    def model_or_404(name: str, version: str | None):
        if name not in models:
            raise ClientError(f"no model {name!r}: this server has {', '.join(models)}", 404)
        if version not in (None, "", "1"):
            raise ClientError(f"model {name!r} has only version 1, not {version!r}", 404)
        return models[name]

    # -- KServe v2 / Triton -----------------------------------------------------------------------
    @app.get("/v2")
    async def server_metadata():
        return {"name": "clip-tao", "version": __version__, "extensions": ["binary_tensor_data", "statistics"]}

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if state["ready"] else 503)

    # Before /v2/models/{name}, which would otherwise take "stats" for a model name.
    @app.get("/v2/models/stats")
    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str | None = None, version: str | None = None):
        names = [model_or_404(name, version).name] if name else list(models)
        return {"model_stats": [_stats(n, batchers[n], state["last_inference_ms"][n]) for n in names]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        return model_or_404(name, version).metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        model_or_404(name, version)
        return Response(status_code=200 if state["ready"] else 503)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None):
        model = model_or_404(name, version)
        return model.config(limits.max_batch_size, limits.dynamic_batching, limits.max_queue_delay_ms)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        model = model_or_404(name, version)
        body = _decompress(await read_body(request), request.headers.get("content-encoding"), limits.max_request_bytes)
        try:
            parsed = parse_infer_request(body, request.headers.get("inference-header-content-length"))
            input_name, tensor = check_request(model, parsed, limits.max_batch_size)
        except ProtocolError as exc:
            raise ClientError(str(exc)) from None
        if input_name == "text":
            items = [_utf8(b, f"input 'text' element {i}") for i, b in enumerate(tensor)]
        elif input_name == "image_bytes":
            items = await run_in_threadpool(_pixels_from_bytes, embedder, list(tensor), "input 'image_bytes'")
        else:
            items = np.ascontiguousarray(tensor, dtype=np.float32)
        embeddings = await _run(name, items)
        output = IMAGE_OUTPUT if name == IMAGE_MODEL else TEXT_OUTPUT
        payload, header_length = encode_infer_response(name, parsed, {output: embeddings})
        headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
        media = "application/json" if header_length is None else "application/octet-stream"
        return Response(payload, media_type=media, headers=headers)

    async def _run(name: str, items) -> np.ndarray:
        if not state["ready"]:
            raise ClientError("the server is shutting down", 503)
        result = await batchers[name].submit(items)
        state["last_inference_ms"][name] = int(time.time() * 1000)
        return result

    # -- OpenAI / NV-CLIP NIM ---------------------------------------------------------------------
    @app.get("/v1/models")
    async def openai_models():
        return {"object": "list", "data": [model_card(served_name, started)]}

    @app.get("/v1/models/{model_id:path}")
    async def openai_model(model_id: str):
        if model_id != served_name:
            raise OpenAIRequestError(f"the model {model_id!r} does not exist: this server serves {served_name!r}", 404)
        return model_card(served_name, started)

    @app.get("/v1/health/live")
    async def openai_live():
        return {"object": "health.response", "message": "live"}

    @app.get("/v1/health/ready")
    async def openai_ready():
        if not state["ready"]:
            raise OpenAIRequestError("the server is not ready", 503)
        return {"object": "health.response", "message": "ready"}

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        body = _json_object(await read_body(request))
        parsed = parse_embeddings_request(body, served_name, embedder.embed_dim, limits.max_batch_size)
        vectors = np.empty((len(parsed), embedder.embed_dim), dtype=np.float32)
        tokens = 0
        # Texts and images go to their own batchers at once, each batched with other clients' requests.
        jobs = []
        if parsed.texts:
            texts = [t for _, t in parsed.texts]
            tokens = count_tokens(embedder.tokenizer, texts)
            jobs.append(([i for i, _ in parsed.texts], _run(TEXT_MODEL, texts)))
        if parsed.images:
            pixels = await run_in_threadpool(_input_pixels, embedder, parsed.images)
            jobs.append(([i for i, _ in parsed.images], _run(IMAGE_MODEL, pixels)))
        results = await asyncio.gather(*(job for _, job in jobs))
        for (positions, _), result in zip(jobs, results):
            vectors[positions] = result
        return embeddings_response(vectors, served_name, parsed.encoding_format, tokens)

    # -- plain JSON ---------------------------------------------------------------------------------
    @app.post("/embed")
    async def embed(request: Request):
        """``{"texts": [...], "images": [base64, ...]}`` -> ``{"text_embeddings": [[...]], "image_embeddings": ...}``."""
        query = _json_object(await read_body(request))
        texts, images = query.get("texts", []), query.get("images", [])
        for key, value in (("texts", texts), ("images", images)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ClientError(f'"{key}" must be a list of strings')
            if len(value) > limits.max_batch_size:
                raise ClientError(f'"{key}" holds {len(value)} items, more than max_batch_size {limits.max_batch_size}')
        if not texts and not images:
            raise ClientError('give "texts" (strings) and/or "images" (base64-encoded JPEG/PNG)')
        result = {"model": embedder.model_type, "dim": embedder.embed_dim}
        if texts:
            result["text_embeddings"] = (await _run(TEXT_MODEL, texts)).tolist()
        if images:
            raw = [_base64(s, f"images[{i}]") for i, s in enumerate(images)]
            pixels = await run_in_threadpool(_pixels_from_bytes, embedder, raw, "images")
            result["image_embeddings"] = (await _run(IMAGE_MODEL, pixels)).tolist()
        return result

    @app.post("/search")
    async def search(request: Request):
        """``{"text": "..."} or {"image": base64}, "k": 5`` -> the top-k images of the collection."""
        if collection is None:
            raise ClientError("this server has no collection: start it with serve.image_embeddings_file", 404)
        query = _json_object(await read_body(request))
        k = query.get("k", 5)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limits.max_top_k:
            raise ClientError(f'"k" must be an integer from 1 to {limits.max_top_k}')
        text, image = query.get("text"), query.get("image")
        if (text is None) == (image is None):
            raise ClientError('give one query: "text" (a string) or "image" (a base64-encoded JPEG/PNG)')
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise ClientError('"text" must be a non-empty string')
            vector = (await _run(TEXT_MODEL, [text]))[0]
        else:
            if not isinstance(image, str):
                raise ClientError('"image" must be a base64 string')
            pixels = await run_in_threadpool(_pixels_from_bytes, embedder, [_base64(image, "image")], "image")
            vector = (await _run(IMAGE_MODEL, pixels))[0]
        results = await run_in_threadpool(collection.search, vector, k)
        for r in results:
            r["thumbnail"] = f"/collection/{r['index']}/thumbnail"
        return {"query": {"text": text} if text is not None else {"image": True}, "k": k, "results": results}

    @app.get("/collection/{index}/thumbnail")
    async def thumbnail(index: int):
        if collection is None or not 0 <= index < len(collection):
            raise ClientError(f"no image {index} in the collection", 404)
        try:
            data = await run_in_threadpool(collection.thumbnail, index)
        except OSError:
            raise ClientError(f"image {index} of the collection cannot be read on the server", 404) from None
        return Response(data, media_type="image/jpeg")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("clip_tao.serve").joinpath("index.html").read_text(encoding="utf-8")

    return app


def _stats(name: str, batcher: DynamicBatcher, last_ms: int) -> dict:
    s = batcher.stats
    return {
        "name": name,
        "version": "1",
        "last_inference": last_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {"compute_infer": {"count": s.execution_count, "ns": s.compute_ns}},
        "batch_stats": [
            {"batch_size": size, "compute_infer": {"count": count}} for size, count in sorted(s.batch_sizes.items())
        ],
    }


def _pixels_from_bytes(embedder: Embedder, data: list[bytes], what: str) -> np.ndarray:
    pixels = []
    for i, raw in enumerate(data):
        try:
            pixels.append(embedder.pixels_from_bytes(bytes(raw)))
        except ImageDecodeError as exc:
            raise ClientError(f"{what} element {i}: {exc}") from None
    return np.stack(pixels)


def _input_pixels(embedder: Embedder, images: list[tuple[int, bytes]]) -> np.ndarray:
    """Pre-processed pixels of ``(position in input, encoded image)`` pairs; errors name ``input[position]``."""
    pixels = []
    for position, raw in images:
        try:
            pixels.append(embedder.pixels_from_bytes(raw))
        except ImageDecodeError as exc:
            raise OpenAIRequestError(f"input[{position}]: {exc}", param="input") from None
    return np.stack(pixels)


def _utf8(raw: bytes, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(f"{what} is not UTF-8 text") from None


def _base64(text: str, what: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data: URL, as a browser's FileReader gives
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"{what} is not valid base64") from None


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClientError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ClientError("the request body must be a JSON object")
    return value


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``Content-Encoding: gzip|deflate`` bodies (``tritonclient``'s request compression), at most ``limit`` inflated."""
    if not encoding or encoding == "identity":
        return body
    import zlib

    if encoding not in ("gzip", "deflate"):
        raise ClientError(f"Content-Encoding {encoding!r} is not supported: use gzip, deflate or none", 415)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ClientError(f"the {encoding} request body cannot be inflated ({exc})") from None
    if len(data) > limit:
        raise ClientError(f"the inflated request body is larger than the server's limit of {limit:,} bytes", 413)
    return data

"""OpenAI's embeddings API as NVIDIA's NV-CLIP NIM serves it: ``POST /v1/embeddings`` and ``GET /v1/models``.

A request's ``input`` is a string or a list of strings. A string ``data:image/<format>;base64,<data>`` is an
image (NV-CLIP's form); any other string is a text. ``modality`` (``"text"`` or ``"image"``, one value or one a
input, NVIDIA's retriever NIMs' field) marks plain base64 strings as images. Embeddings come back in the input's
order as float lists, or with ``encoding_format: "base64"`` as base64 of little-endian float32 (what the
``openai`` client asks for by default and decodes itself). ``usage`` counts the texts' tokens (padding left
out); images count none.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

DATA_URL_PREFIX = "data:image/"


class OpenAIRequestError(ValueError):
    """A request the client must fix; answered in OpenAI's error form with ``status``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class EmbeddingsRequest:
    """The inputs of one request, split by kind, each with its position in ``input``."""

    texts: list[tuple[int, str]]
    images: list[tuple[int, bytes]]
    encoding_format: str

    def __len__(self) -> int:
        return len(self.texts) + len(self.images)


def parse_embeddings_request(body: dict, served_name: str, embed_dim: int, max_items: int) -> EmbeddingsRequest:
    """Check an embeddings request body; :class:`OpenAIRequestError` names the field and the fix."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIRequestError(f'"model" is required: this server serves {served_name!r}', param="model")
    if model != served_name:
        raise OpenAIRequestError(
            f"the model {model!r} does not exist: this server serves {served_name!r}", 404, param="model"
        )
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise OpenAIRequestError(
            f'"encoding_format" must be "float" or "base64", not {encoding_format!r}', param="encoding_format"
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != embed_dim:
        raise OpenAIRequestError(
            f'"dimensions" must be {embed_dim} (the model\'s embedding size) or left out, not {dimensions!r}',
            param="dimensions",
        )
    items = _input_list(body.get("input"), max_items)
    modalities = _modalities(body.get("modality"), len(items))
    texts, images = [], []
    for i, (item, modality) in enumerate(zip(items, modalities)):
        if modality == "image" or (modality is None and item.startswith(DATA_URL_PREFIX)):
            images.append((i, _image_bytes(item, i)))
        else:
            if not item.strip():
                raise OpenAIRequestError(f"input[{i}] is an empty string: give text or an image", param="input")
            texts.append((i, item))
    return EmbeddingsRequest(texts, images, encoding_format)


def _input_list(value, max_items: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise OpenAIRequestError(
            '"input" must be a string or a non-empty list of strings (texts, or images as '
            "data:image/<format>;base64,<data>)",
            param="input",
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            kind = "token ids" if isinstance(item, (int, list)) else type(item).__name__
            raise OpenAIRequestError(
                f"input[{i}] is {kind}, not a string: send texts as strings and images as data: URLs", param="input"
            )
    if len(value) > max_items:
        raise OpenAIRequestError(
            f'"input" holds {len(value)} items, more than the server\'s max_batch_size {max_items}: split the request',
            param="input",
        )
    return value


def _modalities(value, count: int) -> list[str | None]:
    if value is None:
        return [None] * count
    values = [value] * count if isinstance(value, str) else value
    if not isinstance(values, list) or len(values) not in (1, count) or any(v not in ("text", "image") for v in values):
        raise OpenAIRequestError(
            '"modality" must be "text" or "image", or a list of them as long as "input"', param="modality"
        )
    return values * count if len(values) == 1 else values


def _image_bytes(item: str, i: int) -> bytes:
    """The encoded image of a ``data:image/...;base64,`` URL or of a plain base64 string."""
    data = item
    if item.startswith("data:"):
        header, comma, data = item.partition(",")
        if not comma or not header.endswith(";base64"):
            raise OpenAIRequestError(
                f"input[{i}] is a data: URL without base64 image data: give data:image/<format>;base64,<data> "
                "(NVCF asset ids are not supported)",
                param="input",
            )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIRequestError(f"input[{i}] is not valid base64 image data", param="input") from None


def count_tokens(tokenizer, texts: list[str]) -> int:
    """Tokens of ``texts`` as the model sees them (truncated to its context), padding left out.

    The padding id is read from an empty text's encoding, whose last position is always padding.
    """
    if not texts:
        return 0
    ids = tokenizer(list(texts))
    pad = int(tokenizer([""])[0, -1])
    return int((ids != pad).sum())


def embeddings_response(vectors: np.ndarray, model: str, encoding_format: str, prompt_tokens: int) -> dict:
    """OpenAI's ``CreateEmbeddingResponse`` for ``vectors`` ``[N, D]`` in the input's order."""
    data = []
    for i, vector in enumerate(np.asarray(vectors, dtype=np.float32)):
        if encoding_format == "base64":
            embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            embedding = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_card(name: str, created: int) -> dict:
    """One entry of ``GET /v1/models``."""
    return {"id": name, "object": "model", "created": created, "owned_by": "clip-tao"}


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error form, which the ``openai`` client reads into its exceptions."""
    kind = {404: "not_found_error", 413: "invalid_request_error", 503: "service_unavailable"}.get(
        status, "invalid_request_error"
    )
    code = "model_not_found" if status == 404 and param == "model" else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

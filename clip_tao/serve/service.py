"""What the server computes: embeddings from a model (PyTorch, ONNX Runtime or TensorRT) and a collection search.

Everything here is synchronous; the HTTP layer calls it from worker threads through the batchers.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clip_tao.data.transforms import build_eval_transform
from clip_tao.errors import DataError
from clip_tao.search import ImageIndex

log = logging.getLogger(__name__)

# A decoded image may hold at most this many pixels (PIL's own default guards against decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """Bytes a client sent that are not an image PIL can decode."""


class Embedder:
    """``embed_images(pixels [N,3,H,W]) -> [N,D]`` and ``embed_texts(texts) -> [N,D]``, float32, L2-normalised.

    ``model`` is a :class:`ClipModel` or a deployed backend (same surface); ``device`` where its inputs go.
    """

    def __init__(self, model, device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)
        self.preprocess = model.preprocess
        self.image_size = model.preprocess.image_size
        self.embed_dim = int(model.embed_dim)
        self.model_type = model.model_type
        self.tokenizer = model.tokenizer
        self._transform = build_eval_transform(model.preprocess)

    @torch.no_grad()
    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        return self.model.encode_image(batch).float().cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(ids).float().cpu().numpy()

    def pixels_from_bytes(self, data: bytes) -> np.ndarray:
        """An encoded image (JPEG, PNG, ...) -> ``[3, H, W]`` float32, pre-processed as the model expects."""
        return self._transform(decode_image(data)).numpy()


def decode_image(data: bytes) -> Image.Image:
    """RGB image from encoded bytes; :class:`ImageDecodeError` for anything else, including decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"{image.width}x{image.height} pixels is more than the {MAX_IMAGE_PIXELS:,} this server decodes"
                )
            return image.convert("RGB")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a decodable image (an unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageDecodeError(f"not a decodable image ({reason})") from None


@dataclass
class Collection:
    """Image embeddings ``[N, D]`` loaded from TAO's ``image_embeddings.h5``, their image paths, and an index."""

    paths: list[str]
    index: ImageIndex  # or an IndexSearcher: the same search()
    source: str

    @classmethod
    def load(
        cls, path: str | None, embed_dim: int, faiss_min_images: int, key: str = "serve.image_embeddings_file",
        index_file: str | None = None,
    ):  # fmt: skip
        """The collection of ``path`` (TAO's .h5), searched exactly, or through ``index_file`` (clip-tao index)."""
        from clip_tao.io.embeddings import read_embeddings

        if index_file:
            from clip_tao.index.searcher import load_index

            searcher, report, source = load_index(index_file, path, key="serve.index_file")
            if source.dim != embed_dim:
                raise DataError(
                    f"serve.index_file={index_file!r} indexes {source.dim}-d embeddings but the served model makes "
                    f"{embed_dim}-d ones: index a collection embedded with the same model"
                )
            log.info("collection: %d images through %s (%s)", len(source), index_file, report.get("index_key"))
            return cls(source.labels(), searcher, source.path)
        if not os.path.isfile(path):
            raise DataError(f"{key}={path!r} does not exist: write it with clip-tao inference (inference.mode=embed)")
        embeddings, paths, kind = read_embeddings(path)
        if kind != "image":
            raise DataError(f"{key}={path!r} holds {kind} embeddings: give an image_embeddings.h5")
        if embeddings.shape[1] != embed_dim:
            raise DataError(
                f"{key}={path!r} has {embeddings.shape[1]}-d embeddings but the served model makes {embed_dim}-d "
                "ones: embed the collection with the same model"
            )
        use_faiss = len(paths) >= faiss_min_images
        index = ImageIndex(embeddings, use_faiss=use_faiss, index_file=os.path.splitext(path)[0] + ".faiss")
        log.info("collection: %d images from %s (%s)", len(paths), path, "FAISS" if use_faiss else "exact PyTorch")
        return cls(paths, index, path)

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, query: np.ndarray, k: int) -> list[dict]:
        """Top ``k`` images for one query embedding ``[D]``: rank, row index, image path, score."""
        scores, indices = self.index.search(query.reshape(1, -1), k)
        return [
            {"rank": r + 1, "index": int(i), "image_path": self.paths[int(i)], "score": float(s)}
            for r, (i, s) in enumerate(zip(indices[0], scores[0]))
            if i >= 0  # an approximate index may find fewer than k
        ]

    def thumbnail(self, index: int, size: int = 192) -> bytes:
        """A JPEG thumbnail of the collection's image ``index`` (a row of the file, never a client's path)."""
        image = Image.open(self.paths[index])
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=85)
        return out.getvalue()

"""ONNX Runtime backend: exported files run on the CPU (or CUDA when onnxruntime-gpu is installed)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from clip_tao.deploy.files import find_files
from clip_tao.deploy.mixed_precision import ort_session_options
from clip_tao.deploy.runtime import DeployedEncoder
from clip_tao.models.patches import PatchBatch

log = logging.getLogger(__name__)


def _providers(prefer_gpu: bool) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if prefer_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeEncoder(DeployedEncoder):
    """``encode_image`` / ``encode_text`` through ONNX Runtime sessions of a combined or separate export."""

    def __init__(self, onnx_file: str, key: str = "onnx_file", prefer_gpu: bool = True, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(find_files(onnx_file, ".onnx", key), key)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = _providers(prefer_gpu)
        self.sessions = {
            name: ort.InferenceSession(path, sess_options=options, providers=providers, **ort_session_options(path))
            for name, path in self.files.encoders.items()
        }
        log.info("ONNX Runtime (%s): %s", providers[0], ", ".join(self.files.encoders.values()))

    def _run(self, encoder: str, output: str, feed: dict[str, np.ndarray]) -> torch.Tensor:
        self.require(encoder)
        session = self.sessions.get(encoder) or self.sessions["combined"]
        if "combined" in self.sessions and session is self.sessions["combined"]:
            feed = {**self._dummy_inputs(), **feed}  # a combined graph needs every input; only `output` is computed
        (result,) = session.run([output], feed)
        return torch.from_numpy(np.ascontiguousarray(result))

    def _dummy_inputs(self) -> dict[str, np.ndarray]:
        size = self.preprocess.image_size
        ids = np.zeros((1, self.context_length), dtype=np.int64)
        if self.preprocess.naflex:
            p = self.preprocess.patch_size
            image = _patch_feed(PatchBatch(torch.zeros(1, 1, p * p * 3), torch.ones(1, 1, dtype=torch.int32),
                                           torch.ones(1, 2, dtype=torch.long)))  # fmt: skip
        else:
            image = {"image": np.zeros((1, 3, size, size), np.float32)}
        return {**image, "input_ids": ids, "attention_mask": np.ones_like(ids)}

    def encode_image(self, pixels: torch.Tensor | PatchBatch) -> torch.Tensor:
        if isinstance(pixels, PatchBatch):
            return self._run("vision", "image_embedding", _patch_feed(pixels))
        return self._run("vision", "image_embedding", {"image": pixels.detach().float().cpu().numpy()})

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        return self._run("text", "text_embedding", {"input_ids": ids, "attention_mask": np.ones_like(ids)})


def _patch_feed(batch: PatchBatch) -> dict[str, np.ndarray]:
    """A NaFlex export's image inputs, in the dtypes its graph declares."""
    return {
        "pixel_values": batch.pixel_values.detach().float().cpu().numpy(),
        "pixel_attention_mask": batch.pixel_attention_mask.cpu().numpy().astype(np.int32),
        "spatial_shapes": batch.spatial_shapes.cpu().numpy().astype(np.int64),
    }

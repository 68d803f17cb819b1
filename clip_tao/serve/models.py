"""The two served models, ``clip_image`` and ``clip_text``: their Triton metadata and request checks.

``clip_image`` takes ``image`` (FP32 ``[B, 3, H, W]``, pre-processed pixels) or ``image_bytes`` (BYTES
``[B]`` or ``[B, 1]``, encoded JPEG/PNG pre-processed here) and returns ``image_embedding`` FP32 ``[B, D]``.
``clip_text`` takes ``text`` (BYTES ``[B]`` or ``[B, 1]``, UTF-8, tokenised here) and returns
``text_embedding`` FP32 ``[B, D]``. Output names are TAO's (the exported ONNX files' names).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip_tao.serve.protocol import InferRequest, ProtocolError

IMAGE_MODEL, TEXT_MODEL = "clip_image", "clip_text"
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embedding", "text_embedding"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # without the batch axis

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}

    def config(self) -> dict:
        return {
            "name": self.name,
            "data_type": f"TYPE_{'STRING' if self.datatype == 'BYTES' else self.datatype}",
            "dims": list(self.shape),
        }


@dataclass(frozen=True)
class ServedModel:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "clip-tao",
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def config(self, max_batch_size: int, dynamic_batching: bool, max_queue_delay_ms: float) -> dict:
        """The model's configuration in Triton's JSON form (``GET /v2/models/{name}/config``)."""
        config = {
            "name": self.name,
            "platform": "clip-tao",
            "max_batch_size": max_batch_size,
            "input": [t.config() for t in self.inputs],
            "output": [t.config() for t in self.outputs],
        }
        if dynamic_batching:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": int(max_queue_delay_ms * 1000)}
        return config


def served_models(image_size: int, embed_dim: int) -> dict[str, ServedModel]:
    return {
        IMAGE_MODEL: ServedModel(
            IMAGE_MODEL,
            (TensorSpec("image", "FP32", (3, image_size, image_size)), TensorSpec("image_bytes", "BYTES", (1,))),
            (TensorSpec(IMAGE_OUTPUT, "FP32", (embed_dim,)),),
        ),
        TEXT_MODEL: ServedModel(
            TEXT_MODEL, (TensorSpec("text", "BYTES", (1,)),), (TensorSpec(TEXT_OUTPUT, "FP32", (embed_dim,)),)
        ),
    }


def check_request(model: ServedModel, request: InferRequest, max_batch_size: int) -> tuple[str, np.ndarray]:
    """The one input a request gives (its name and tensor), checked against the model's inputs.

    Raises :class:`ProtocolError` with what to change for unknown inputs or outputs, a wrong datatype,
    a wrong shape, or a batch over ``max_batch_size``.
    """
    known = {t.name: t for t in model.inputs}
    unknown = sorted(set(request.inputs) - set(known))
    if unknown:
        raise ProtocolError(f"model {model.name!r} has no input {unknown[0]!r}; its inputs are {', '.join(known)}")
    if len(request.inputs) != 1:
        raise ProtocolError(f"model {model.name!r} takes one of its inputs ({' or '.join(known)}), not several")
    outputs = {t.name for t in model.outputs}
    wrong = sorted(set(request.outputs) - outputs)
    if wrong:
        raise ProtocolError(f"model {model.name!r} has no output {wrong[0]!r}; its output is {', '.join(outputs)}")
    ((name, tensor),) = request.inputs.items()
    spec = known[name]
    if request.datatypes[name] != spec.datatype:
        raise ProtocolError(f"input {name!r} must be {spec.datatype}, got {request.datatypes[name]}")
    shape = tuple(tensor.shape)
    if spec.datatype == "BYTES":
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise ProtocolError(f"input {name!r} must have shape [batch] or [batch, 1], got {list(shape)}")
        tensor = tensor.reshape(-1)
    elif len(shape) != len(spec.shape) + 1 or shape[1:] != spec.shape:
        raise ProtocolError(
            f"input {name!r} must have shape [batch, {', '.join(map(str, spec.shape))}], got {list(shape)}"
        )
    if shape[0] < 1:
        raise ProtocolError(f"input {name!r} has an empty batch")
    if shape[0] > max_batch_size:
        raise ProtocolError(
            f"input {name!r} has a batch of {shape[0]}, more than the server's max_batch_size {max_batch_size}: "
            "split the request"
        )
    return name, tensor

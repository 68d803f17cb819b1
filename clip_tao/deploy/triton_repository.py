"""A Triton Inference Server model repository from exported files: ``config.pbtxt`` + ``1/model.onnx|plan``.

Separate files become two models that Triton batches dynamically, named as ``clip-tao serve`` names them:
``clip_image`` (``image`` FP32 [3,H,W] -> ``image_embedding`` [D]) and ``clip_text`` (``input_ids``,
``attention_mask`` INT64 [L] -> ``text_embedding`` [D]; tokenise with the ``X_tokenizer/`` written beside the
export). A combined file becomes one model, ``clip``, without Triton batching (``max_batch_size: 0``), because
its image and text batches are independent axes and Triton batches all inputs along one. A file exported
with a fixed ``batch_size`` is not batched by Triton either. The logit scale/bias outputs are left out of the
batched models: they have no batch axis, so Triton could not split them between requests.

``config.pbtxt`` is protobuf text of Triton's ``ModelConfig`` (model_config.proto). Tensor types are read
from the ONNX graph; a mixed-precision (``export.data_type: fp16``) file keeps fp32 inputs/outputs and gets
ONNX Runtime's extended graph optimisation level.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace

import onnx

from clip_tao.deploy.files import DeployFiles
from clip_tao.deploy.mixed_precision import file_data_type
from clip_tao.errors import ConfigError
from clip_tao.io.atomic import link_or_copy

IMAGE_MODEL, TEXT_MODEL, COMBINED_MODEL = "clip_image", "clip_text", "clip"
_MODEL_NAMES = {"vision": IMAGE_MODEL, "text": TEXT_MODEL, "combined": COMBINED_MODEL}
# Triton's onnxruntime backend graph level 1 is ONNX Runtime's ORT_ENABLE_EXTENDED: everything but the CPU
# layout optimiser, which crashes on some mixed-precision graphs (see clip_tao.deploy.mixed_precision).
FP16_GRAPH_LEVEL = 1
# onnx.TensorProto element types -> Triton's (model_config.proto); an fp16 export may have TYPE_FP16 tensors.
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]  # without the batch axis when the model is batched


@dataclass(frozen=True)
class Sizes:
    image_size: int
    embed_dim: int
    context_length: int


def model_names(files: DeployFiles) -> list[str]:
    return [_MODEL_NAMES[encoder] for encoder in files.encoders]


def check_repository_free(repository: str, encoder_type: str, overwrite: bool) -> None:
    """Refuse, before any work, to replace model folders that exist (unless ``overwrite``)."""
    names = [COMBINED_MODEL] if encoder_type == "combined" else [IMAGE_MODEL, TEXT_MODEL]
    existing = [os.path.join(repository, n) for n in names if os.path.exists(os.path.join(repository, n))]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]} already exists: export never overwrites; choose another export.triton_repository "
            "or set export.overwrite=true"
        )


def write_triton_repository(
    files: DeployFiles,
    repository: str,
    sizes: Sizes,
    *,
    max_batch_size: int = 32,
    max_queue_delay_ms: float = 5.0,
    static_batch: int | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write one model folder a file of ``files`` into ``repository``; returns model name -> folder.

    ``static_batch`` is the fixed batch of files exported with ``export.batch_size > 0`` (``None``: dynamic).
    Every folder is built in a staging folder and moved into place only when complete.
    """
    check_repository_free(repository, "combined" if files.combined else "separate", overwrite)
    if max_batch_size < 1:
        raise ConfigError(f"serve.max_batch_size={max_batch_size} must be >= 1 for the Triton repository")
    is_onnx = files.ext == ".onnx"
    platform, filename = ("onnxruntime_onnx", "model.onnx") if is_onnx else ("tensorrt_plan", "model.plan")
    os.makedirs(repository, exist_ok=True)
    staging = tempfile.mkdtemp(dir=repository, prefix=".triton-")
    written = {}
    try:
        for encoder, source in files.encoders.items():
            name = _MODEL_NAMES[encoder]
            inputs, outputs = _io(encoder, sizes)
            graph_level = None
            if is_onnx:  # the tensor types are the graph's: a mixed-precision export may have fp16 inputs/outputs
                types = graph_io_types(source)
                if file_data_type(source) == "fp16":
                    graph_level = FP16_GRAPH_LEVEL
                inputs, outputs = (
                    [replace(t, data_type=types.get(t.name, t.data_type)) for t in ts] for ts in (inputs, outputs)
                )
            batched = encoder != "combined" and static_batch is None
            if not batched:  # Triton then sees the batch axis as an ordinary dimension
                batch = static_batch if static_batch is not None else -1
                inputs = [Tensor(t.name, t.data_type, (batch, *t.dims)) for t in inputs]
                outputs = [
                    Tensor(t.name, t.data_type, t.dims if t.name.startswith("logit") else (batch, *t.dims))
                    for t in outputs
                ]
            text = model_config_text(
                name, platform, inputs, outputs,
                max_batch_size=max_batch_size if batched else 0,
                max_queue_delay_ms=max_queue_delay_ms if batched else None,
                filename=filename,
                graph_level=graph_level,
            )  # fmt: skip
            folder = os.path.join(staging, name)
            os.makedirs(os.path.join(folder, "1"))
            with open(os.path.join(folder, "config.pbtxt"), "w", encoding="utf-8") as f:
                f.write(text)
            link_or_copy(source, os.path.join(folder, "1", filename))
            if os.path.isfile(source + ".data"):  # ONNX external weights keep the name the graph refers to
                link_or_copy(source + ".data", os.path.join(folder, "1", os.path.basename(source) + ".data"))
            written[name] = os.path.join(repository, name)
        for name, target in written.items():
            if os.path.isdir(target):  # only reached with overwrite (checked above)
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def graph_io_types(onnx_file: str) -> dict[str, str]:
    """Triton's ``TYPE_*`` name of every input and output of an ONNX file (its weights are not read)."""
    graph = onnx.load(onnx_file, load_external_data=False).graph
    types = {}
    for value in [*graph.input, *graph.output]:
        elem_type = value.type.tensor_type.elem_type
        if elem_type not in _TRITON_TYPES:
            raise ConfigError(
                f"{onnx_file}: {value.name} is {onnx.TensorProto.DataType.Name(elem_type)}, which the Triton "
                "repository writer does not map; export again with clip-tao export"
            )
        types[value.name] = _TRITON_TYPES[elem_type]
    return types


def _io(encoder: str, s: Sizes) -> tuple[list[Tensor], list[Tensor]]:
    image = Tensor("image", "TYPE_FP32", (3, s.image_size, s.image_size))
    ids = [
        Tensor("input_ids", "TYPE_INT64", (s.context_length,)),
        Tensor("attention_mask", "TYPE_INT64", (s.context_length,)),
    ]
    image_out = Tensor("image_embedding", "TYPE_FP32", (s.embed_dim,))
    text_out = Tensor("text_embedding", "TYPE_FP32", (s.embed_dim,))
    if encoder == "vision":
        return [image], [image_out]
    if encoder == "text":
        return ids, [text_out]
    logits = [Tensor("logit_scale", "TYPE_FP32", (1,)), Tensor("logit_bias", "TYPE_FP32", (1,))]
    return [image, *ids], [image_out, text_out, *logits]


def model_config_text(
    name: str,
    platform: str,
    inputs: list[Tensor],
    outputs: list[Tensor],
    *,
    max_batch_size: int,
    max_queue_delay_ms: float | None,
    filename: str,
    graph_level: int | None = None,
) -> str:
    """``config.pbtxt`` in protobuf text format."""

    def tensors(field: str, items: list[Tensor]) -> list[str]:
        lines = [f"{field} ["]
        for i, t in enumerate(items):
            lines += [
                "  {",
                f'    name: "{t.name}"',
                f"    data_type: {t.data_type}",
                f"    dims: [ {', '.join(str(d) for d in t.dims)} ]",
                "  }" + ("," if i < len(items) - 1 else ""),
            ]
        return [*lines, "]"]

    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f'default_model_filename: "{filename}"',
        f"max_batch_size: {max_batch_size}",
        *tensors("input", inputs),
        *tensors("output", outputs),
    ]
    if max_queue_delay_ms is not None:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {int(round(max_queue_delay_ms * 1000))}", "}"]
    if graph_level is not None:
        lines += ["optimization {", "  graph {", f"    level: {graph_level}", "  }", "}"]
    lines += ["instance_group [", "  {", "    count: 1", "    kind: KIND_AUTO", "  }", "]"]
    return "\n".join(lines) + "\n"

"""Export a :class:`ClipModel` to ONNX with TAO's input/output names, then verify the file.

Combined file: inputs ``image`` [B,3,H,W] float32, ``input_ids`` [B,L] int64, ``attention_mask`` [B,L]
(accepted and ignored: the models always use an all-ones mask); outputs ``image_embedding`` [B,D],
``text_embedding`` [B,D] (L2-normalised), ``logit_scale`` [1] (exponentiated) and ``logit_bias`` [1].
Separate files: ``X_vision.onnx`` (image -> image_embedding, logit_scale, logit_bias, as TAO's) and
``X_text.onnx`` (input_ids, attention_mask -> text_embedding, logit_scale, logit_bias). NaFlex models take
the patch sequence in place of ``image`` (see :mod:`clip_tao.deploy.naflex_export`).

Every file is written to a temporary folder, checked with ``onnx.checker`` and compared with PyTorch
through ONNX Runtime, and only then moved into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from clip_tao.deploy.encoder_graphs import BATCH_AXES, ENCODER_SPECS, EncoderSpec
from clip_tao.deploy.files import DeployFiles, check_overwritable, planned_files
from clip_tao.deploy.mixed_precision import DATA_TYPES, FP16_MIN_OPSET, convert_to_mixed_fp16, ort_session_options
from clip_tao.deploy.naflex_export import naflex_encoder_specs, naflex_example_inputs
from clip_tao.errors import ConfigError, ModelError
from clip_tao.io.atomic import write_yaml
from clip_tao.models.base import ClipModel
from clip_tao.models.tokenizer import CONFIG_FILE as TOKENIZER_SETTINGS

log = logging.getLogger(__name__)

TWO_GB = 2**31
MAX_ABS_DIFF = 1e-4  # fp32 files: every output
MIN_COSINE = 0.9999  # fp16 files: every embedding, against PyTorch in fp32
MAX_LOGIT_REL_DIFF = 1e-4  # fp16 files: logit scale/bias, computed in fp32 inside them
EMBEDDINGS = ("image_embedding", "text_embedding")


@dataclass
class ExportReport:
    files: DeployFiles
    data_type: str = "fp32"
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    min_cosine: dict[str, float] = field(default_factory=dict)
    external_data: list[str] = field(default_factory=list)


def encoder_specs(model: ClipModel) -> dict[str, EncoderSpec]:
    """The graphs a model exports to: :data:`ENCODER_SPECS`, or NaFlex's patch-sequence ones."""
    if model.preprocess.naflex:
        return naflex_encoder_specs()
    return ENCODER_SPECS


def check_exportable(model: ClipModel, height: int, width: int, channels: int) -> None:
    """Refuse what cannot become a fixed-graph ONNX file, with the fix in the message."""
    if model.preprocess.naflex:
        return  # images of any size arrive as patch sequences; export.input_height/width do not apply
    if not getattr(model, "exportable", True):
        raise ModelError(
            f"{model.model_type} has dynamic resolution and cannot be exported to ONNX; "
            "use a fixed-resolution type such as siglip2-so400m-patch16-384"
        )
    if channels != 3:
        raise ConfigError(f"export.input_channel={channels}: the models take RGB images, use 3")
    if (height, width) != (model.image_size, model.image_size):
        raise ConfigError(
            f"export.input_height/input_width={height}x{width} does not fit {model.model_type}, which takes "
            f"{model.image_size}x{model.image_size} images; leave them unset or set model.image_size to build it at another size"
        )


def example_inputs(
    model: ClipModel, batch: int, height: int, width: int, device: torch.device
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    texts = [f"a photo of item number {i}, seen from the left" for i in range(batch)]
    input_ids = model.tokenizer(texts)
    return {
        "image": torch.randn(batch, 3, height, width, generator=generator).to(device),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
    }


def export_onnx(
    model: ClipModel,
    onnx_file: str,
    *,
    encoder_type: str = "combined",
    opset_version: int = 17,
    batch_size: int = -1,
    height: int | None = None,
    width: int | None = None,
    channels: int = 3,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    verbose: bool = False,
    spec: dict | None = None,
    external_data_threshold: int = TWO_GB,
    data_type: str = "fp32",
) -> ExportReport:
    """Write, verify and move into place the ONNX file(s) of ``model`` (see module docstring).

    ``data_type="fp16"`` writes mixed-precision files (:mod:`clip_tao.deploy.mixed_precision`), verified by
    the cosine of every embedding to PyTorch's fp32 one instead of the absolute difference.

    ``spec`` (the resolved experiment spec as plain data) goes to ``X_config.yaml`` with the learned
    logit scale/bias and a ``deploy`` section (pre-processing, sizes) that the runtime backends read.
    """
    height = height or model.image_size
    width = width or model.image_size
    check_exportable(model, height, width, channels)
    check_data_type(data_type, opset_version)
    if not onnx_file.endswith(".onnx"):
        raise ConfigError(f"export.onnx_file={onnx_file!r} must end in .onnx")
    files = planned_files(onnx_file, ".onnx", encoder_type)
    targets = [*files.encoders.values(), files.config, files.tokenizer]
    existing = [p for p in targets if os.path.exists(p)]
    if existing and overwrite:
        check_overwritable(files, TOKENIZER_SETTINGS)
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]} already exists: export never overwrites; choose another export.onnx_file or set export.overwrite=true"
        )

    device = torch.device(device)
    model = model.to(device).eval()
    trace_batch = batch_size if batch_size > 0 else 2
    inputs = example_inputs(model, trace_batch, height, width, device)
    specs, extra_checks = encoder_specs(model), []
    if model.preprocess.naflex:
        inputs, *extra_checks = naflex_example_inputs(model, trace_batch, batch_size <= 0, device, inputs)
    parent = os.path.dirname(os.path.abspath(onnx_file))
    os.makedirs(parent, exist_ok=True)
    report = ExportReport(files, data_type)
    staging = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        for encoder, final_path in files.encoders.items():
            # Each encoder in a folder of its own: the exporter may write weight files beside it.
            own = os.path.join(staging, encoder)
            os.mkdir(own)
            staged = os.path.join(own, os.path.basename(final_path))
            encoder_spec = specs[encoder]
            _export_one(encoder_spec, model, inputs, staged, opset_version, batch_size, verbose)
            if _finalise(staged, model.embed_dim, external_data_threshold, data_type):
                report.external_data.append(final_path + ".data")
            checks = [
                verify_onnx(staged, encoder_spec, model, checked, data_type) for checked in [inputs, *extra_checks]
            ]
            report.max_abs_diff[encoder] = max(c.max_abs_diff for c in checks)
            report.min_cosine[encoder] = min(c.min_cosine for c in checks)
            log.info(
                "%s (%s): max |ONNX Runtime - PyTorch| = %.2e, min cosine %.7f",
                os.path.basename(final_path), data_type, report.max_abs_diff[encoder], report.min_cosine[encoder],
            )  # fmt: skip
            for name in os.listdir(own):
                os.replace(os.path.join(own, name), os.path.join(staging, name))
            os.rmdir(own)
        model.tokenizer.save_pretrained(os.path.join(staging, os.path.basename(files.tokenizer)))
        write_yaml(
            os.path.join(staging, os.path.basename(files.config)),
            deploy_config(model, spec or {}, encoder_type, opset_version, data_type),
        )
        _move_into_place(staging, parent, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def check_data_type(data_type: str, opset_version: int) -> None:
    if data_type not in DATA_TYPES:
        raise ConfigError(f"export.data_type={data_type!r}: use one of {', '.join(DATA_TYPES)}")
    if data_type == "fp16" and opset_version < FP16_MIN_OPSET:
        raise ConfigError(
            f"export.data_type=fp16 needs export.opset_version >= {FP16_MIN_OPSET} (got {opset_version}): "
            "LayerNormalization is one op (kept in fp32) only from that opset on"
        )


def deploy_config(model: ClipModel, spec: dict, encoder_type: str, opset_version: int, data_type: str = "fp32") -> dict:
    """The spec with the learned logit scale/bias, plus what a runtime needs to feed the files."""
    config = copy.deepcopy(spec)
    scale, bias = float(model.logit_scale.detach().reshape(-1)[0]), float(model.logit_bias.detach().reshape(-1)[0])
    config.setdefault("model", {}).update(
        {"type": model.model_type, "init_logit_scale": scale, "init_logit_bias": bias}
    )
    p = model.preprocess
    config["deploy"] = {
        "model_type": model.model_type,
        "encoder_type": encoder_type,
        "embed_dim": model.embed_dim,
        "image_size": p.image_size,
        "mean": list(p.mean),
        "std": list(p.std),
        "interpolation": p.interpolation,
        "resize_mode": p.resize_mode,
        "context_length": model.context_length,
        "logit_scale": math.exp(scale),
        "logit_bias": bias,
        "opset_version": opset_version,
        "data_type": data_type,
    }
    if p.naflex:
        config["deploy"].update({"patch_size": p.patch_size, "max_num_patches": p.max_num_patches})
    return config


def _export_one(spec: EncoderSpec, model, inputs, path: str, opset: int, batch_size: int, verbose: bool) -> None:
    wrapper = spec.module(model).eval()
    args = tuple(inputs[name] for name in spec.inputs)
    dynamic_axes = None
    if batch_size <= 0:
        dynamic_axes = {name: {0: BATCH_AXES[name]} for name in (*spec.inputs, *spec.outputs) if name in BATCH_AXES}
        dynamic_axes.update(spec.axes)
    elif spec.axes:  # a fixed batch: only the other dynamic axes
        dynamic_axes = {name: {k: v for k, v in axes.items() if k != 0} for name, axes in spec.axes.items()}
    with torch.no_grad(), warnings.catch_warnings(), _no_attention_fastpath():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow are expected
        torch.onnx.export(
            wrapper,
            args,
            path,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            verbose=verbose,
            dynamo=False,  # the TorchScript exporter gives stable names and dynamic axes for these models
        )


def _finalise(path: str, embed_dim: int, threshold: int, data_type: str = "fp32") -> bool:
    """Convert to mixed precision (fp16), give the embedding outputs their static width, and keep the weights
    of files over 2 GB as ONNX external data (``X.onnx.data``). Returns whether external data was written."""
    import onnx

    model = convert_to_mixed_fp16(path) if data_type == "fp16" else onnx.load(path, load_external_data=True)
    for output in model.graph.output:
        if output.name in EMBEDDINGS:
            dim = output.type.tensor_type.shape.dim[1]
            dim.ClearField("dim_param")
            dim.dim_value = embed_dim
    folder = os.path.dirname(path)
    for stale in os.listdir(folder):  # the exporter's own per-tensor files, if any
        if stale != os.path.basename(path):
            os.remove(os.path.join(folder, stale))
    # ByteSize() itself fails past protobuf's 2 GB limit, so add up the weights instead.
    external = sum(len(t.raw_data) for t in model.graph.initializer) > threshold
    if external:
        location = os.path.basename(path) + ".data"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    else:
        onnx.save_model(model, path)
    return external


@dataclass(frozen=True)
class Check:
    max_abs_diff: float
    min_cosine: float  # over every embedding row


def verify_onnx(
    path: str, spec: EncoderSpec, model: ClipModel, inputs: dict[str, torch.Tensor], data_type: str = "fp32"
) -> Check:
    """``onnx.checker`` then ONNX Runtime (CPU) against PyTorch (fp32) on the same inputs.

    fp32 files fail above :data:`MAX_ABS_DIFF` on any output; fp16 files fail when an embedding's cosine to
    PyTorch's is below :data:`MIN_COSINE` or the logit scale/bias differ by more than :data:`MAX_LOGIT_REL_DIFF`.
    ONNX Runtime's CPU runs an fp16 node without an fp16 kernel in fp32 between casts, so its activations are
    still rounded to fp16 between nodes as written in the graph.
    """
    import onnx
    import onnxruntime as ort

    file_name = os.path.basename(path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"exported file {file_name} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"], **ort_session_options(path))
    feed = {name: inputs[name].cpu().numpy() for name in spec.inputs}
    got = dict(zip(spec.outputs, session.run(list(spec.outputs), feed)))
    wrapper = spec.module(model).eval()
    with torch.no_grad(), _exact_float32():
        want = wrapper(*(inputs[name] for name in spec.inputs))
    want = want if isinstance(want, tuple) else (want,)
    want = {output: w.float().cpu().numpy() for output, w in zip(spec.outputs, want)}
    diff = max(float(np.abs(got[k].astype(np.float32) - want[k]).max()) for k in spec.outputs)
    cosine = min(_min_cosine(got[k], want[k]) for k in spec.outputs if k in EMBEDDINGS)
    if data_type == "fp32" and diff > MAX_ABS_DIFF:
        raise ModelError(
            f"exported file {file_name} differs from PyTorch by {diff:.2e} (> {MAX_ABS_DIFF:g}); try another export.opset_version"
        )
    if data_type == "fp16":
        if cosine < MIN_COSINE:
            raise ModelError(
                f"exported fp16 file {file_name} has an embedding at cosine {cosine:.6f} to PyTorch's fp32 one "
                f"(< {MIN_COSINE}); export with export.data_type=fp32"
            )
        for k in spec.outputs:
            if k not in EMBEDDINGS and not np.allclose(got[k], want[k], rtol=MAX_LOGIT_REL_DIFF, atol=0):
                raise ModelError(f"exported fp16 file {file_name}: {k} is {got[k]} where PyTorch gives {want[k]}")
    return Check(diff, cosine)


def _min_cosine(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    norms = np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1)
    return float(((got * want).sum(-1) / np.maximum(norms, 1e-300)).min())


@contextlib.contextmanager
def _no_attention_fastpath():
    """nn.MultiheadAttention's inference fast path is a fused op that ONNX has no export for."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    saved = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(saved)


@contextlib.contextmanager
def _exact_float32():
    """Turn TF32 off while comparing: on NVIDIA GPUs cuDNN convolutions use it by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _move_into_place(staging: str, parent: str, overwrite: bool) -> None:
    for name in sorted(os.listdir(staging)):
        source, target = os.path.join(staging, name), os.path.join(parent, name)
        if os.path.isdir(target) and overwrite:
            shutil.rmtree(target)
        os.replace(source, target)

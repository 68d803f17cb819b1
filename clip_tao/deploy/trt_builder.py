"""Build TensorRT engines from exported ONNX files with the TensorRT Python API (TensorRT 10 and 11).

How each engine is built (strongly or weakly typed, which flags) is :func:`build_plan`, a pure function of
the TensorRT version, ``tensorrt.data_type`` and the precision of the ONNX graph, so it is tested without a GPU.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from dataclasses import dataclass

from clip_tao.config.schema import TensorRTConfig
from clip_tao.deploy.files import DeployFiles
from clip_tao.deploy.mixed_precision import file_data_type
from clip_tao.deploy.tensorrt_support import import_tensorrt
from clip_tao.errors import ConfigError, ModelError
from clip_tao.io.atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineBuild:
    onnx_file: str
    engine_file: str
    fp32_layers: int
    strongly_typed: bool


def build_engines(
    onnx: DeployFiles,
    engines: DeployFiles,
    trt_cfg: TensorRTConfig,
    batch_size: int = -1,
    timing_cache: str | None = None,
    verbose: bool = False,
) -> list[EngineBuild]:
    """One engine per ONNX file of ``onnx`` (both of a ``_vision``/``_text`` pair), config and tokenizer copied."""
    trt = import_tensorrt()
    _check_profile(trt_cfg, batch_size)
    builds = []
    for encoder, onnx_file in onnx.encoders.items():
        engine_file = engines.encoders[encoder]
        fp32_layers, plan = _build_one(trt, onnx_file, engine_file, trt_cfg, batch_size, timing_cache, verbose)
        builds.append(EngineBuild(onnx_file, engine_file, fp32_layers, plan.strongly_typed))
    # The runtime needs the same companions as the ONNX files: the spec with deploy info, and the tokenizer.
    shutil.copyfile(onnx.config, engines.config)
    if os.path.isdir(engines.tokenizer):
        shutil.rmtree(engines.tokenizer)
    shutil.copytree(onnx.tokenizer, engines.tokenizer)
    return builds


def _check_profile(cfg: TensorRTConfig, batch_size: int) -> None:
    if batch_size <= 0 and not 1 <= cfg.min_batch_size <= cfg.opt_batch_size <= cfg.max_batch_size:
        raise ConfigError(
            "gen_trt_engine.tensorrt batch sizes must satisfy 1 <= min_batch_size <= opt_batch_size <= max_batch_size, "
            f"got {cfg.min_batch_size}/{cfg.opt_batch_size}/{cfg.max_batch_size}"
        )
    if cfg.workspace_size <= 0:
        raise ConfigError(f"gen_trt_engine.tensorrt.workspace_size={cfg.workspace_size} must be > 0 (MB)")


@dataclass(frozen=True)
class BuildPlan:
    """How one engine is built: the network's creation flags, the builder flags and the per-layer steps."""

    strongly_typed: bool  # precision as written in the ONNX graph
    creation_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]  # BuilderFlag members
    keep_sensitive_fp32: bool  # mark LayerNorm, Softmax, reductions and the final normalisation fp32


def build_plan(trt_version: str, data_type: str, graph_type: str, onnx_file: str, layers_precision=()) -> BuildPlan:
    """The build for TensorRT ``trt_version``, ``tensorrt.data_type`` and an ONNX graph computing in
    ``graph_type`` (:func:`~clip_tao.deploy.mixed_precision.graph_data_type`).

    - A mixed-precision (fp16) graph is built strongly typed, on TensorRT 10 and 11 alike: the precision of
      every layer is the graph's. TensorRT 11 networks are always strongly typed (its STRONGLY_TYPED flag is
      deprecated and ignored); TensorRT 10 needs the flag.
    - An fp32 graph with data_type=fp16 is TensorRT 10's weakly typed build: the FP16 builder flag, with the
      sensitive layers held in fp32 by OBEY_PRECISION_CONSTRAINTS. TensorRT 11 removed both flags, so there the
      graph itself must be fp16 (export.data_type=fp16).
    """
    major = int(trt_version.split(".")[0])
    if major < 10:
        raise ConfigError(
            f'gen_trt_engine needs TensorRT 10 or newer (found {trt_version}): pip install "clip-tao[trt]"'
        )
    if graph_type == "fp16" and data_type != "fp16":
        raise ConfigError(
            f"{onnx_file} is a mixed-precision fp16 export (export.data_type=fp16): build it with "
            "gen_trt_engine.tensorrt.data_type=fp16, or export with export.data_type=fp32 for an fp32 engine"
        )
    if data_type == "fp16" and graph_type != "fp16" and major >= 11:
        raise ConfigError(
            f"TensorRT {trt_version} builds the precision written in the ONNX graph, and {onnx_file} is fp32: "
            "export with export.data_type=fp16 and build from that file (or build with data_type=fp32)"
        )
    strongly_typed = graph_type == "fp16" or major >= 11
    if strongly_typed and layers_precision:
        raise ConfigError(
            "gen_trt_engine.tensorrt.layers_precision needs a weakly typed build (TensorRT 10 from an fp32 export); "
            f"TensorRT {trt_version} builds {onnx_file} strongly typed, with the precisions written in the graph: "
            "leave layers_precision empty"
        )
    if strongly_typed:
        return BuildPlan(True, ("STRONGLY_TYPED",) if major == 10 else (), (), False)
    if data_type == "fp16":
        return BuildPlan(False, (), ("FP16", "OBEY_PRECISION_CONSTRAINTS"), True)
    return BuildPlan(False, (), (), False)


def _build_one(
    trt, onnx_file, engine_file, cfg: TensorRTConfig, batch_size, timing_cache, verbose
) -> tuple[int, BuildPlan]:
    plan = build_plan(trt.__version__, cfg.data_type, file_data_type(onnx_file), onnx_file, cfg.layers_precision)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.creation_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_file):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_size << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.keep_sensitive_fp32:
        fp32_layers = _keep_sensitive_layers_fp32(trt, network)
    else:
        fp32_layers = _count_fp32_layers(trt, network) if plan.strongly_typed and cfg.data_type == "fp16" else 0
    if not plan.strongly_typed:
        _apply_layer_precisions(trt, network, cfg.layers_precision)
    config.add_optimization_profile(_batch_profile(builder, network, cfg, batch_size))
    cache = _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(
            f"TensorRT could not build an engine from {onnx_file}; run with gen_trt_engine.verbose=true for details"
        )
    with atomic_path(engine_file) as tmp, open(tmp, "wb") as f:
        f.write(serialized)
    if timing_cache and cache is not None:
        with atomic_path(timing_cache) as tmp, open(tmp, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    typing = "strongly typed" if plan.strongly_typed else "weakly typed"
    log.info("built %s (%s, %s, %d layers in fp32)", engine_file, cfg.data_type, typing, fp32_layers)
    return fp32_layers, plan


def _count_fp32_layers(trt, network) -> int:
    """Layers of a strongly typed network computing in fp32 (the graph's LayerNorm, Softmax, ...)."""
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):
            continue
        if any(layer.get_output(j).dtype == trt.float32 for j in range(layer.num_outputs)):
            count += 1
    return count


def _keep_sensitive_layers_fp32(trt, network) -> int:
    """LayerNorm, Softmax, reductions and the final L2 normalisation stay fp32 (SigLIP2 loses accuracy
    in fp16 otherwise). The final normalisation is every layer between an output and the last matmul."""
    producers = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer
    sensitive = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    marked = {network.get_layer(i).name for i in range(network.num_layers) if network.get_layer(i).type in sensitive}
    stop = {trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.CONVOLUTION}
    stack = [producers.get(network.get_output(i).name) for i in range(network.num_outputs)]
    while stack:
        layer = stack.pop()
        if layer is None or layer.type in stop or layer.name in marked:
            continue
        marked.add(layer.name)
        stack.extend(
            producers.get(layer.get_input(k).name) for k in range(layer.num_inputs) if layer.get_input(k) is not None
        )
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in marked and layer.type not in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):
            _set_precision(trt, layer, trt.float32)
            count += 1
    return count


def _set_precision(trt, layer, dtype) -> None:
    layer.precision = dtype
    for j in range(layer.num_outputs):
        if layer.get_output_type(j) in (trt.float32, trt.float16):
            layer.set_output_type(j, dtype)


def _apply_layer_precisions(trt, network, entries: list[str]) -> None:
    """``layers_precision`` entries are ``"<layer name or shell pattern>:<fp32|fp16>"``."""
    types = {"fp32": trt.float32, "fp16": trt.float16}
    for entry in entries:
        pattern, _, name = entry.rpartition(":")
        if not pattern or name not in types:
            raise ConfigError(
                f"gen_trt_engine.tensorrt.layers_precision entry {entry!r} must look like 'layer_name:fp32'"
            )
        hits = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if fnmatch.fnmatch(layer.name, pattern):
                _set_precision(trt, layer, types[name])
                hits += 1
        if not hits:
            log.warning("layers_precision %r matched no layer", entry)


def _batch_profile(builder, network, cfg: TensorRTConfig, batch_size: int):
    """min/opt/max on the batch axis of every input (all equal to ``batch_size`` when it is fixed)."""
    profile = builder.create_optimization_profile()
    sizes = (batch_size,) * 3 if batch_size > 0 else (cfg.min_batch_size, cfg.opt_batch_size, cfg.max_batch_size)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise ModelError(f"input {tensor.name} has dynamic axes besides the batch: {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, *[(b, *rest) for b in sizes])
    return profile


def _load_timing_cache(config, path: str | None):
    if not path:
        return None
    data = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache

"""``clip-tao gen_trt_engine``: TensorRT engine(s) from exported ONNX file(s)."""

from __future__ import annotations

import os

from clip_tao.config.schema import ExperimentConfig
from clip_tao.deploy.files import find_files, planned_files
from clip_tao.deploy.tensorrt_support import import_tensorrt
from clip_tao.deploy.trt_builder import build_engines
from clip_tao.errors import ConfigError, NotAvailableError
from clip_tao.io.tables import format_table
from clip_tao.io.task_dir import prepare_task_dir


def run(cfg: ExperimentConfig) -> dict:
    g = cfg.gen_trt_engine
    if not g.onnx_file or not g.trt_engine:
        raise ConfigError("gen_trt_engine.onnx_file and gen_trt_engine.trt_engine are both required")
    onnx = find_files(g.onnx_file, ".onnx", "gen_trt_engine.onnx_file")
    _refuse_patch_sequences(onnx.config)
    import_tensorrt()  # fail first, with the one-line reason, when TensorRT or a GPU is missing
    ext = os.path.splitext(g.trt_engine)[1] or ".engine"
    engines = planned_files(g.trt_engine, ext, "combined" if onnx.combined else "separate")
    out_dir, status = prepare_task_dir(cfg, "gen_trt_engine")
    status.write("STARTED", "Starting TensorRT engine build.")
    try:
        builds = build_engines(onnx, engines, g.tensorrt, g.batch_size, g.timing_cache, g.verbose)
    except Exception as exc:
        status.write("FAILURE", f"Engine build failed: {exc}")
        raise
    rows = [
        [b.onnx_file, b.engine_file, g.tensorrt.data_type, "strong" if b.strongly_typed else "weak", b.fp32_layers]
        for b in builds
    ]
    print(format_table(["onnx", "engine", "precision", "typing", "layers in fp32"], rows))
    summary = {"engines": [b.engine_file for b in builds], "data_type": g.tensorrt.data_type}
    status.write("SUCCESS", "Engine build finished.", kpi=summary)
    return summary


def _refuse_patch_sequences(config_file: str) -> None:
    """NaFlex exports take patch sequences; no TensorRT profile is built for them (ONNX Runtime runs them)."""
    from clip_tao.config.loader import read_spec_file

    if os.path.isfile(config_file) and (read_spec_file(config_file).get("deploy") or {}).get("max_num_patches"):
        raise NotAvailableError(
            f"{config_file}: TensorRT engines of NaFlex (patch-sequence) exports are not supported; "
            "run the ONNX file with ONNX Runtime (evaluate.onnx_file / inference.onnx_file)"
        )

"""``clip-tao export``: ONNX file(s) with TAO's names, verified against PyTorch, with config and tokenizer."""

from __future__ import annotations

import logging
import os

import torch

from clip_tao.config.loader import config_to_dict
from clip_tao.config.schema import ExperimentConfig
from clip_tao.deploy.files import export_lock_path
from clip_tao.deploy.onnx_export import check_data_type, encoder_specs, export_onnx
from clip_tao.deploy.triton_repository import Sizes, check_repository_free, write_triton_repository
from clip_tao.engine.model_setup import build_model
from clip_tao.errors import ConfigError
from clip_tao.io.locks import exclusive_claim
from clip_tao.io.tables import format_table
from clip_tao.io.task_dir import failure_message, prepare_task_dir

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict:
    x = cfg.export
    if not x.onnx_file:
        raise ConfigError("export.onnx_file is required: the path of the .onnx file to write")
    if x.opset_version < 14:
        raise ConfigError(f"export.opset_version={x.opset_version}: use 14 or newer (17 is TAO's default)")
    check_data_type(x.data_type, x.opset_version)
    if x.triton_repository:
        check_repository_free(x.triton_repository, x.encoder_type, x.overwrite)
    out_dir, status = prepare_task_dir(cfg, "export")
    status.write("STARTED", "Starting export.")
    try:
        # Claimed before the existence check: a second export to the same file fails instead of mixing files.
        with exclusive_claim(export_lock_path(x.onnx_file), f"export.onnx_file={x.onnx_file}"):
            summary = _export(cfg)
    except (Exception, KeyboardInterrupt) as exc:
        status.write("FAILURE", failure_message("Export", exc))
        raise
    status.write("SUCCESS", "Export finished.", kpi=summary)
    return summary


def _export(cfg: ExperimentConfig) -> dict:
    x = cfg.export
    use_gpu = not x.on_cpu and torch.cuda.is_available()
    device = torch.device("cuda", x.gpu_id) if use_gpu else torch.device("cpu")
    # No checkpoint means the model type's own (pretrained) weights, as TAO does.
    model = build_model(cfg, x.checkpoint)
    if x.triton_repository and model.preprocess.naflex:
        # Triton's config describes fixed [3, H, W] images; a patch-sequence graph needs its own (not written yet).
        raise ConfigError(
            "export.triton_repository: NaFlex models are not written as a Triton repository yet; "
            "leave export.triton_repository null (the ONNX file itself runs with evaluate/inference.onnx_file)"
        )
    report = export_onnx(
        model,
        x.onnx_file,
        encoder_type=x.encoder_type,
        opset_version=x.opset_version,
        batch_size=x.batch_size,
        height=x.input_height,
        width=x.input_width,
        channels=x.input_channel,
        device=device,
        overwrite=x.overwrite,
        verbose=x.verbose,
        spec=config_to_dict(cfg),
        data_type=x.data_type,
    )
    rows = []
    for encoder, path in report.files.encoders.items():
        spec = encoder_specs(model)[encoder]
        size_mb = os.path.getsize(path) / 2**20
        rows.append(
            [
                os.path.basename(path),
                ", ".join(spec.inputs),
                ", ".join(spec.outputs),
                f"{size_mb:.1f} MB",
                f"{report.max_abs_diff[encoder]:.1e}",
                f"{report.min_cosine[encoder]:.6f}",
            ]
        )
    print(
        f"\nExported {model.model_type} ({'dynamic' if x.batch_size <= 0 else x.batch_size} batch, opset {x.opset_version}, {x.data_type})"
    )
    print(format_table(["file", "inputs", "outputs", "size", "max |ORT - PyTorch|", "min cosine"], rows))
    print(f"beside it: {os.path.basename(report.files.config)}, {os.path.basename(report.files.tokenizer)}/")
    if x.triton_repository:
        folders = write_triton_repository(
            report.files,
            x.triton_repository,
            Sizes(model.image_size, model.embed_dim, model.context_length),
            max_batch_size=cfg.serve.max_batch_size,
            max_queue_delay_ms=cfg.serve.max_queue_delay_ms,
            static_batch=x.batch_size if x.batch_size > 0 else None,
            overwrite=x.overwrite,
        )
        print(f"Triton model repository {x.triton_repository}: {', '.join(folders)}")
    return {
        "model_type": model.model_type,
        "files": list(report.files.encoders.values()),
        "data_type": x.data_type,
        "max_abs_diff": max(report.max_abs_diff.values()),
        "min_cosine": min(report.min_cosine.values()),
        "external_data": report.external_data,
    }

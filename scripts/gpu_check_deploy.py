#!/usr/bin/env python
"""GPU check of export and deployment, no downloads (random-init models).

For each model type: export to ONNX from the model on CUDA in fp32 and in mixed-precision fp16 (export
verifies ONNX Runtime on the CPU against PyTorch: fp32 fails above 1e-4, fp16 below cosine 0.9999), then
compare with the fp32 ONNX files run by ONNX Runtime: the fp16 files through ONNX Runtime, PyTorch on CUDA in
fp32, bf16 and fp16 autocast, and, where TensorRT is installed, TensorRT engines of both precisions (fp32;
fp16 strongly typed from the fp16 file; on TensorRT 10 also fp16 by builder flags from the fp32 file), and
time image/text embedding through each.

    python scripts/gpu_check_deploy.py                               # CUDA: tiny-siglip2 and siglip2-so400m-patch16-256
    python scripts/gpu_check_deploy.py --cpu --models tiny-siglip2   # checks the script on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_tao.config.schema import TensorRTConfig  # noqa: E402
from clip_tao.deploy.files import find_files, planned_files  # noqa: E402
from clip_tao.deploy.onnx_export import export_onnx  # noqa: E402
from clip_tao.deploy.ort_backend import OnnxRuntimeEncoder  # noqa: E402
from clip_tao.deploy.tensorrt_support import import_tensorrt  # noqa: E402
from clip_tao.errors import NotAvailableError  # noqa: E402
from clip_tao.models import add_model_config, create_model, get_model_info  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, x, iters: int, device: torch.device) -> float:
    """Items per second of ``fn(x)``."""
    with torch.no_grad():
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return x.shape[0] * iters / (time.perf_counter() - start)


def offline_variant(model_type: str) -> str:
    """The same architecture with open_clip's bundled tokenizer, so no tokenizer download is needed
    (token ids stay within both vocabularies; this check is about numerics, not about tokenization)."""
    info = get_model_info(model_type)
    if info.config.get("tokenizer") == "openclip-bpe":
        return model_type
    name = f"{model_type}+bundled-tokenizer"
    config = {**copy.deepcopy(info.config), "tokenizer": "openclip-bpe"}
    fields = {"family": info.family, "image_size": info.image_size, "embed_dim": info.embed_dim}
    add_model_config({**fields, "context_length": info.context_length, "weights": "none", "config": config}, name=name)
    return name


def check(model_type: str, device: torch.device, batch: int, iters: int) -> dict:
    model = create_model(offline_variant(model_type), pretrained=False).eval()
    size = model.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    ids = model.tokenizer([f"a photo of object {i}, taken at night" for i in range(batch)])
    row: dict = {
        "model": model_type,
        "device": str(device),
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
    }
    with tempfile.TemporaryDirectory() as folder:
        for data_type in ("fp32", "fp16"):
            start = time.perf_counter()
            target = os.path.join(folder, data_type, "m.onnx")
            report = export_onnx(model.to(device), target, encoder_type="separate", device=device, data_type=data_type)
            row[f"export_{data_type}_s"] = round(time.perf_counter() - start, 1)
            row[f"export_{data_type}_verify_max_abs_diff"] = max(report.max_abs_diff.values())
            row[f"export_{data_type}_verify_min_cosine"] = round(min(report.min_cosine.values()), 7)
        onnx = OnnxRuntimeEncoder(os.path.join(folder, "fp32", "m_vision.onnx"), prefer_gpu=True)
        with torch.no_grad():
            ref_image, ref_text = onnx.encode_image(pixels), onnx.encode_text(ids)
        row["ort_images_per_s"] = round(timed(onnx.encode_image, pixels, iters, torch.device("cpu")), 1)
        row["ort_texts_per_s"] = round(timed(onnx.encode_text, ids, iters, torch.device("cpu")), 1)
        onnx16 = OnnxRuntimeEncoder(os.path.join(folder, "fp16", "m_vision.onnx"), prefer_gpu=True)
        compare(row, "ort_fp16", onnx16.encode_image(pixels), onnx16.encode_text(ids), ref_image, ref_text)
        row.update(tensorrt_rows(folder, pixels, ids, ref_image, ref_text, batch, iters))
    px, tx = pixels.to(device), ids.to(device)
    for name, dtype in DTYPES.items():
        if dtype is not None and device.type == "cpu" and dtype is torch.float16:
            continue

        def image_fn(x, dtype=dtype):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return model.encode_image(x).float()

        def text_fn(x, dtype=dtype):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return model.encode_text(x).float()

        with torch.no_grad():
            image, text = image_fn(px).cpu(), text_fn(tx).cpu()
        compare(row, name, image, text, ref_image, ref_text)
        row[f"{name}_images_per_s"] = round(timed(image_fn, px, iters, device), 1)
        row[f"{name}_texts_per_s"] = round(timed(text_fn, tx, iters, device), 1)
    if device.type == "cuda":
        row["peak_gpu_memory_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def compare(row: dict, name: str, image, text, ref_image, ref_text) -> None:
    """Largest difference and smallest cosine of ``name``'s embeddings to the fp32 ONNX Runtime ones."""
    image, text = image.float().cpu(), text.float().cpu()
    row[f"{name}_vs_onnx_max_abs"] = round(
        float(max((image - ref_image).abs().max(), (text - ref_text).abs().max())), 6
    )
    row[f"{name}_vs_onnx_min_cosine"] = round(
        float(min(F.cosine_similarity(image, ref_image).min(), F.cosine_similarity(text, ref_text).min())), 6
    )


def tensorrt_builds(trt_version: str) -> list[tuple[str, str, str]]:
    """(name, ONNX precision, tensorrt.data_type) of the engines to build on this TensorRT version."""
    builds = [("trt_fp32", "fp32", "fp32"), ("trt_fp16", "fp16", "fp16")]
    if int(trt_version.split(".")[0]) == 10:  # TensorRT 10's weakly typed fp16 build from the fp32 file
        builds.append(("trt_fp16_builder_flags", "fp32", "fp16"))
    return builds


def tensorrt_rows(folder: str, pixels, ids, ref_image, ref_text, batch: int, iters: int) -> dict:
    """Engines of both precisions compared with the fp32 ONNX Runtime embeddings, or why there are none."""
    try:
        trt = import_tensorrt()
    except NotAvailableError as exc:
        return {"tensorrt": f"not run: {exc}"}
    from clip_tao.deploy.trt_backend import TensorRTEncoder
    from clip_tao.deploy.trt_builder import build_engines

    row: dict = {"tensorrt": trt.__version__}
    for name, graph_type, data_type in tensorrt_builds(trt.__version__):
        cfg = TensorRTConfig(data_type=data_type, min_batch_size=1, opt_batch_size=batch, max_batch_size=batch)
        onnx_files = find_files(os.path.join(folder, graph_type, "m.onnx"), ".onnx", "onnx_file")
        engines = planned_files(os.path.join(folder, name, "m.engine"), ".engine", "separate")
        os.makedirs(os.path.join(folder, name))
        start = time.perf_counter()
        builds = build_engines(onnx_files, engines, cfg)
        row[f"{name}_build_s"] = round(time.perf_counter() - start, 1)
        row[f"{name}_fp32_layers"] = [b.fp32_layers for b in builds]
        encoder = TensorRTEncoder(engines.encoders["vision"])
        compare(row, name, encoder.encode_image(pixels), encoder.encode_text(ids), ref_image, ref_text)
        row[f"{name}_images_per_s"] = round(timed(encoder.encode_image, pixels, iters, torch.device("cuda")), 1)
        row[f"{name}_texts_per_s"] = round(timed(encoder.encode_text, ids, iters, torch.device("cuda")), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-siglip2", "siglip2-so400m-patch16-256"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    for model_type in args.models:
        print(json.dumps(check(model_type, device, args.batch, args.iters)), flush=True)


if __name__ == "__main__":
    main()

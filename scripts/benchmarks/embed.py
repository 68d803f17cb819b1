"""``embed``: image and text embeddings/s through PyTorch (eager, compiled), ONNX Runtime and TensorRT, with the
image tower's FLOPs utilisation. For a NaFlex type the inputs are patch batches of mixed aspect ratios
(portrait, landscape, strip).
"""

from __future__ import annotations

import contextlib
import os
import time

from benchmarks.core import build_random_model, count_flops, peak_tflops, register_openclip_arch, utilisation

NAME = "embed"
HELP = "embedding throughput: PyTorch eager, torch.compile, ONNX Runtime, TensorRT"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny-clip")
    parser.add_argument(
        "--openclip-arch", help="use one of open_clip's architectures instead, e.g. ViT-B-32 (random init)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    parser.add_argument("--no-onnx", action="store_true", help="PyTorch only (no ONNX Runtime / TensorRT rows)")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile row")
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast of PyTorch runs"
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU (default: table / measured)")


def bench_embed(args) -> dict:
    """Image and text embedding throughput through PyTorch eager, torch.compile, ONNX Runtime (and TensorRT)."""
    import tempfile

    import torch

    if args.openclip_arch:
        args.model = register_openclip_arch(args.openclip_arch)

    from clip_tao.deploy.onnx_export import export_onnx
    from clip_tao.deploy.ort_backend import OnnxRuntimeEncoder

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, token_ids = build_random_model(args.model)
    model = model.eval()
    size = model.image_size
    pixels = torch.randn(args.batch, 3, size, size)
    if model.preprocess.naflex:  # images of mixed aspect ratios at the model's patch budget
        from clip_tao.deploy.naflex_export import example_patch_batch

        pixels = example_patch_batch(model, args.batch, model.preprocess.max_num_patches)
    inputs = (
        f"patch batches of mixed aspect ratios, {pixels.num_patches} patches"
        if model.preprocess.naflex
        else f"{size}x{size} images"
    )
    ids = token_ids(args.batch)

    from clip_tao.engine.device import resolve_precision

    precision = resolve_precision(args.precision, device)
    with torch.no_grad():
        image_flops = count_flops(lambda: model.encode_image(pixels))

    def rate(encode_image, encode_text, inputs_device) -> dict:
        px, tx = pixels.to(inputs_device), ids.to(inputs_device)
        out = {}
        autocast = precision.autocast(inputs_device) if inputs_device == device else contextlib.nullcontext()
        for kind, fn, x in (("image", encode_image, px), ("text", encode_text, tx)):
            with torch.no_grad(), autocast:
                for _ in range(args.warmup):
                    fn(x)
                if inputs_device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.iters):
                    fn(x)
                if inputs_device.type == "cuda":
                    torch.cuda.synchronize()
            out[f"{kind}_items_per_s"] = round(args.batch * args.iters / (time.perf_counter() - start), 1)
        peak = peak_tflops(inputs_device, precision.name if inputs_device == device else "fp32", args.peak_tflops)[0]
        image = utilisation(image_flops / args.batch, out["image_items_per_s"], peak)
        out.update({f"image_{k}": v for k, v in image.items()})
        return out

    rows = {}
    torch_model = model.to(device)
    rows["pytorch_eager"] = {"device": str(device), **rate(torch_model.encode_image, torch_model.encode_text, device)}
    try:
        if args.no_compile:
            raise RuntimeError("skipped (--no-compile)")
        rows["pytorch_compile"] = {
            "device": str(device),
            **rate(torch.compile(torch_model.encode_image), torch.compile(torch_model.encode_text), device),
        }
    except Exception as exc:  # a missing compiler toolchain must not hide the other figures
        rows["pytorch_compile"] = {"error": str(exc).splitlines()[0][:200]}
    if args.no_onnx or model.tokenizer is None:  # exporting needs the tokenizer (saved beside the files)
        return _embed_result(args, precision, image_flops, device, rows, inputs)
    with tempfile.TemporaryDirectory() as folder:
        onnx_file = os.path.join(folder, "m.onnx")
        export_onnx(model.to("cpu"), onnx_file, encoder_type="separate")
        ort_encoder = OnnxRuntimeEncoder(os.path.join(folder, "m_vision.onnx"), prefer_gpu=False)
        rows["onnxruntime_cpu"] = {
            "device": "cpu",
            **rate(ort_encoder.encode_image, ort_encoder.encode_text, torch.device("cpu")),
        }
        if device.type == "cuda":
            rows["tensorrt"] = _tensorrt_rate(folder, rate)
    return _embed_result(args, precision, image_flops, device, rows, inputs)


def _embed_result(args, precision, image_flops: int, device, rows: dict, inputs: str) -> dict:
    eager, ort_rates = rows["pytorch_eager"], rows.get("onnxruntime_cpu")
    speedup = {}
    if eager["device"] == "cpu" and ort_rates:
        speedup = {k: round(ort_rates[k] / eager[k], 2) for k in ("image_items_per_s", "text_items_per_s")}
    return {
        "benchmark": "embed",
        "model": args.model,
        "batch": args.batch,
        "inputs": inputs,
        "precision": precision.name,
        "image_gflop_per_item": round(image_flops / args.batch / 1e9, 3),
        "peak_source": peak_tflops(device, precision.name, args.peak_tflops)[1],
        "runs": rows,
        "ort_cpu_vs_eager_cpu": speedup,
    }


def _tensorrt_rate(folder: str, rate) -> dict:
    import torch

    try:
        from clip_tao.config.schema import TensorRTConfig
        from clip_tao.deploy.files import find_files, planned_files
        from clip_tao.deploy.trt_backend import TensorRTEncoder
        from clip_tao.deploy.trt_builder import build_engines

        onnx = find_files(os.path.join(folder, "m_vision.onnx"), ".onnx", "onnx")
        engines = planned_files(os.path.join(folder, "m.engine"), ".engine", "separate")
        build_engines(onnx, engines, TensorRTConfig(data_type="fp16", max_batch_size=256, opt_batch_size=32))
        encoder = TensorRTEncoder(engines.encoders["vision"])
        return {"device": "cuda", **rate(encoder.encode_image, encoder.encode_text, torch.device("cuda"))}
    except Exception as exc:  # TensorRT is optional
        return {"error": str(exc).splitlines()[0][:200]}


run = bench_embed

#!/usr/bin/env python
"""Speed and memory of clip-tao's hot paths, measured (never asserted by tests).

    python scripts/benchmark.py train --model tiny-clip --batch 32 --steps 30
    python scripts/benchmark.py embed --model tiny-clip --batch 32
    python scripts/benchmark.py eval --n 5000 --captions-per-image 5 --dim 512 --counting eager compiled
    python scripts/benchmark.py eval --n 200000 --dim 1152 --dense-n 30000
    python scripts/benchmark.py data --n 1024 --size 224 --workers 0 1 2
    python scripts/benchmark.py serve --model tiny-clip --clients 16 --requests 2000
    python scripts/benchmark.py embed --model tiny-siglip2-naflex --batch 32
    python scripts/benchmark.py quickstart --threads unset 1
    python scripts/benchmark.py vs-open-clip          # needs pandas: pip install -e ".[bench]"

``train``: training samples/s (forward + backward + optimiser step) on random inputs, against the bare
forward+backward of the same model (the floor clip-tao's step adds to), with the model FLOPs utilisation.
``embed``: image and text embeddings/s through PyTorch (eager, compiled), ONNX Runtime and TensorRT, with
the image tower's FLOPs utilisation.
MFU: the FLOPs of one step or batch as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matrix
products, convolutions, attention), times the measured rate, over the device's dense peak for the precision
(a table of data-sheet peaks for common GPUs; on the CPU a measured large matrix product; ``--peak-tflops``).
``eval``: wall time and peak memory of the exact chunked retrieval metrics against the bare similarity
matrix product of the same size (the floor), and against the dense computation at a size where it fits.
Each measurement runs in a fresh process (imports and any compilation included, as ``clip-tao evaluate``
pays them) so its time and peak memory are its own.
``vs-open-clip``: samples/s of clip-tao's trainer against open_clip's own (``open_clip_train``) on the same
architecture, data and settings, each in its own process.
``quickstart``: wall time of ``clip-tao train -e specs/quickstart.yaml`` with ``OMP_NUM_THREADS`` unset
and set, and the machine's load average before and after.
``data``: samples/s of the training loaders (decode + augment + tokenize + collate) for custom folders and
WebDataset shards with N workers, against the same pipeline written with plain PIL + torchvision in one
process, on the same generated JPEGs; then the NaFlex pipeline (``--naflex-patches``: crop, aspect-preserving
resize into the patch budget, patch batches) on the same files, with how much of its batches is padding
(padded to each batch's longest sequence, to the budget, and if batches were grouped by patch count).
``embed``: for a NaFlex type the inputs are patch batches of mixed aspect ratios (portrait, landscape, strip).
``serve``: ``clip-tao serve`` started on 127.0.0.1 with dynamic batching on, then off; N concurrent
``tritonclient.http`` clients send one-item requests; requests/s, p50/p99 latency and the mean batch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (bf16/fp16 tensor, tf32 tensor, fp32).
# Matched in this order against torch.cuda.get_device_name(); --peak-tflops for anything else.
GPU_PEAK_TFLOPS = [
    ("H200", (989.4, 494.7, 66.9)),
    ("H100 PCIe", (756.5, 378.0, 51.2)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM ("H100 80GB HBM3")
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.1, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("A10", (125.0, 62.5, 31.2)),
    ("V100", (125.0, 15.7, 15.7)),  # fp16 tensor cores; no bf16 or tf32
    ("T4", (65.0, 8.1, 8.1)),
]


def peak_tflops(device, precision: str, override: float | None = None) -> tuple[float | None, str]:
    """The device's dense peak for ``precision`` (``bf16``/``fp16``/``fp32``) and where the figure comes from."""
    import torch

    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"
        for key, (half, tf32_peak, fp32) in GPU_PEAK_TFLOPS:
            if key in name:
                value = half if precision in ("bf16", "fp16") else (tf32_peak if tf32 else fp32)
                kind = precision if precision != "fp32" else ("tf32" if tf32 else "fp32")
                return value, f"{name} data sheet, dense {kind}"
        return None, f"{name} is not in the table: pass --peak-tflops"
    rate, library = measured_gemm_tflops(device, precision)
    return rate, f"measured {precision} 2048x2048 matrix product ({library})"


@functools.lru_cache
def measured_gemm_tflops(device, precision: str, size: int = 2048, seconds: float = 1.0) -> tuple[float, str]:
    """TFLOP/s of a large square matrix product on ``device`` in ``precision`` (the CPU's practical peak), and
    which library gave it. On the CPU the faster of PyTorch's BLAS and ONNX Runtime's: on some CPUs (AMD with
    AVX-512) MKL takes a slower path than ONNX Runtime's own kernels, and a peak below what ONNX Runtime
    reaches would put its MFU above 100 %."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    rate = _repeat_rate(lambda: a @ b, seconds, torch.cuda.synchronize if device.type == "cuda" else None)
    best = (2 * size**3 * rate / 1e12, "PyTorch")
    if device.type == "cpu" and dtype == torch.float32:
        with contextlib.suppress(ImportError):
            run = _onnxruntime_matmul(size, torch.get_num_threads())
            best = max(best, (2 * size**3 * _repeat_rate(lambda: run(a.numpy(), b.numpy()), seconds) / 1e12,
                              "ONNX Runtime"))  # fmt: skip
    return best


def _repeat_rate(fn, seconds: float, synchronize=None) -> float:
    """Calls of ``fn`` a second, after one warm-up call, over about ``seconds``."""
    fn()
    if synchronize is not None:
        synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    if synchronize is not None:
        synchronize()
    return count / (time.perf_counter() - start)


def _onnxruntime_matmul(size: int, threads: int):
    """``run(a, b) -> a @ b`` through ONNX Runtime on the CPU, with ``threads`` threads."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    square = [size, size]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, square) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, square)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda a, b: session.run(None, {"a": a, "b": b})


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn``, as PyTorch's own counter sees them (not a formula).

    Two kernels the counter does not know are made visible: nn.MultiheadAttention's fused inference operator
    (it would hide every projection of open_clip's attention) is turned off while counting, so the same
    products run as operators the counter sees; the CPU's flash attention (forward and backward) is counted
    with the counter's own formulas for the GPU's flash attention.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: (
            lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
                grad, query, key, value
            )
        ),
    }
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops()


def utilisation(flops: float, per_second: float, peak: float | None) -> dict:
    """TFLOP/s and MFU (percent of ``peak``) for ``flops`` done ``per_second`` times a second."""
    rate = flops * per_second / 1e12
    return {"tflops": float(f"{rate:.4g}"), "mfu_percent": round(100 * rate / peak, 1) if peak else None}


# -- models ---------------------------------------------------------------------------------------
def build_random_model(name: str, device=None):
    """``(model, token_ids(n))`` for a clip-tao model type, randomly initialised. Types whose tokenizer must be
    downloaded (real-size SigLIP2, C-RADIO, NV-CLIP) are built from the package's architecture files without
    one, and fed random token ids: what the towers compute does not depend on which ids they are."""
    import copy

    import torch

    from clip_tao.errors import ModelError
    from clip_tao.models import create_model
    from clip_tao.models.registry import get_model_info

    try:
        with torch.device(device or "cpu"):  # initialise on the device: far faster for a billion parameters
            model = create_model(name, pretrained=False)
    except ModelError:
        info = get_model_info(name)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gpu_check_models

        with torch.device(device or "cpu"):
            if info.family == "siglip":
                model, _, vocab, context = gpu_check_models.build_siglip2(name, small=False)
            elif info.family == "radio":
                model, _, vocab, context = gpu_check_models.build_radio(name, small=False)
            elif info.family == "openclip":
                from clip_tao.models.base import preprocess_from_config
                from clip_tao.models.openclip_family import OpenClipModel, build_openclip_module

                cfg = copy.deepcopy(info.config)
                module = build_openclip_module(cfg)
                model = OpenClipModel(name, module, None, preprocess_from_config(cfg, info.image_size))
                vocab, context = cfg["text_cfg"]["vocab_size"], cfg["text_cfg"].get("context_length", 77)
            else:
                raise
        model.init_logits(2.3026, -10.0)
        generator = torch.Generator().manual_seed(0)
        return model, lambda n: torch.randint(2, vocab, (n, context), generator=generator)
    return model, lambda n: model.tokenizer([f"a photo of thing number {i} on a table" for i in range(n)])


# -- train ------------------------------------------------------------------------------------------
def bench_train(args) -> dict:
    """clip-tao's own training step (the trainer's ``contrastive_backward``) against a bare forward+backward."""
    import torch

    from clip_tao.config.schema import OptimConfig
    from clip_tao.engine.device import enable_fast_matmul, resolve_precision
    from clip_tao.engine.distributed import ContrastiveForward
    from clip_tao.engine.optim import build_optimizer, parameter_groups
    from clip_tao.engine.step import contrastive_backward
    from clip_tao.losses import ContrastiveLoss

    if args.openclip_arch:
        args.model = register_openclip_arch(args.openclip_arch)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    precision = resolve_precision(args.precision, device)
    if not args.no_fast_math:
        enable_fast_matmul(device)
    model, token_ids = build_random_model(args.model, device)
    model = model.to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    net = ContrastiveForward(model)
    size = model.image_size
    pixels = torch.randn(args.batch, 3, size, size, device=device)
    ids = token_ids(args.batch).to(device)
    micro = args.batch // args.accumulate
    parts = [(pixels[k : k + micro], ids[k : k + micro]) for k in range(0, args.batch, micro)]
    loss_fn = ContrastiveLoss(args.loss)
    optimizer = build_optimizer(model, OptimConfig())
    if args.no_fused:  # the optimiser before fused AdamW became the CUDA default
        optim = OptimConfig()
        optimizer = torch.optim.AdamW(parameter_groups(model, optim), betas=tuple(optim.betas), eps=optim.eps,
                                      foreach=True)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)

    def step(full: bool) -> None:
        if full:
            optimizer.zero_grad(set_to_none=True)
            contrastive_backward(net, loss_fn, parts, precision, device, scaler if scaler.is_enabled() else None)
            scaler.step(optimizer)
            scaler.update()
            model.clamp_logit_scale()
        else:
            with precision.autocast(device):
                image, text, scale, bias = net(pixels, ids)
                loss = loss_fn(image.float(), text.float(), scale, bias)
            loss.backward()

    def timed(full: bool) -> float:
        for _ in range(3):
            step(full)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(full)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.batch * args.steps / (time.perf_counter() - start)

    flops = count_flops(lambda: step(True))  # counted in eager mode: compiled kernels are not seen
    if args.compile:
        net.compile()
    peak, peak_source = peak_tflops(device, precision.name, args.peak_tflops)
    rate, bare = timed(True), timed(False)
    return {
        "benchmark": "train",
        "model": args.model,
        "batch": args.batch,
        "accumulate": args.accumulate,
        "precision": precision.name,
        "device": str(device),
        "compiled": args.compile,
        "tf32": torch.backends.cuda.matmul.fp32_precision == "tf32",
        "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else ""),
        "train_samples_per_s": round(rate, 1),
        "gflop_per_sample": round(flops / args.batch / 1e9, 3),
        **utilisation(flops, rate / args.batch, peak),
        "peak_tflops": float(f"{peak:.4g}") if peak else None,
        "peak_source": peak_source,
        "forward_backward_only_samples_per_s": round(bare, 1),
        "peak_rss_mb": round(peak_rss_mb()),
    }


# -- embed ----------------------------------------------------------------------------------------
def register_openclip_arch(name: str) -> str:
    """Make one of open_clip's own architectures (e.g. ViT-B-32) a clip-tao model type, randomly initialised."""
    import open_clip

    from clip_tao.models import add_model_config

    arch = open_clip.get_model_config(name)
    if arch is None:
        raise SystemExit(f"open_clip has no architecture {name!r}; see open_clip.list_models()")
    vision, text = dict(arch["vision_cfg"]), dict(arch["text_cfg"])
    model_type = f"openclip-{name}"
    add_model_config(
        {
            "family": "openclip",
            "image_size": vision["image_size"],
            "embed_dim": arch["embed_dim"],
            "context_length": text.get("context_length", 77),
            "weights": "none (random init, benchmark only)",
            "config": {
                "embed_dim": arch["embed_dim"],
                "vision_cfg": vision,
                "text_cfg": text,
                "tokenizer": "openclip-bpe",
            },
        },
        name=model_type,
    )
    return model_type


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


# -- eval -------------------------------------------------------------------------------------------
def _eval_child(mode: str, n: int, per: int, dim: int, chunk: int, device: str, counting: str) -> dict:
    """One measurement in a fresh process: the clock starts before clip-tao's metrics module is imported."""
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    owner = torch.arange(n).repeat_interleave(per)
    texts = torch.nn.functional.normalize(images[owner] + 0.5 * torch.randn(n * per, dim, generator=g), dim=-1)
    images, texts = images.to(device), texts.to(device)
    base = peak_rss_mb()
    start = time.perf_counter()
    from clip_tao import metrics

    metrics.COUNTING = counting
    step = chunk or max(1, metrics.BLOCK_ELEMENTS // n)
    figures = {}
    if mode == "chunked":
        figures = metrics.retrieval_metrics(images, texts, owner, chunk_size=step)
    elif mode == "dense":  # the whole similarity matrix at once
        figures = metrics.retrieval_metrics(images, texts, owner, chunk_size=n * per)
    else:  # the floor: the bare similarity product, in the same blocks, result discarded
        for s in range(0, n * per, step):
            _ = texts[s : s + step] @ images.T
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "mode": mode if mode == "product" else f"{mode} ({counting})",
        "images": n,
        "captions": n * per,
        "seconds": round(seconds, 2),
        "extra_peak_rss_mb": round(peak_rss_mb() - base),
        "figures": {k: figures[k] for k in ("i2t_R@1", "t2i_R@1", "i2t_mAP", "t2i_mAP", "t2i_MeanR") if k in figures},
    }


def bench_eval(args) -> dict:
    """Chunked metrics (each ``--counting``) and the bare product at ``--n``; dense and chunked at ``--dense-n``."""

    def child(mode: str, n: int, counting: str = "eager") -> dict:
        cmd = [sys.executable, __file__, "_eval_child", mode, str(n), str(args.captions_per_image), str(args.dim),
               str(args.chunk), args.device, counting]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    runs = [child("product", args.n)]
    runs += [child("chunked", args.n, counting) for counting in args.counting]
    ratios = {run["mode"]: round(run["seconds"] / runs[0]["seconds"], 2) for run in runs[1:]}
    if args.dense_n:
        runs += [child("dense", args.dense_n), child("chunked", args.dense_n)]
    same = all(run["figures"] == runs[1]["figures"] for run in runs[1 : 1 + len(args.counting)])
    return {"benchmark": "eval", "dim": args.dim, "device": args.device, "vs_product": ratios,
            "same_figures": same, "runs": runs, "load_average": os.getloadavg()}  # fmt: skip


# -- quickstart ------------------------------------------------------------------------------------
def bench_quickstart(args) -> dict:
    """``clip-tao train -e specs/quickstart.yaml`` end to end, once per ``--threads`` setting."""
    import tempfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for threads in args.threads:
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        if threads != "unset":
            env["OMP_NUM_THREADS"] = threads
        with tempfile.TemporaryDirectory() as out:
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "clip_tao.cli", "train", "-e", "specs/quickstart.yaml", f"results_dir={out}"]
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - start
        runs.append({"OMP_NUM_THREADS": threads, "seconds": round(seconds, 1),
                     "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]})  # fmt: skip
    return {"benchmark": "quickstart", "runs": runs, "cpus": os.cpu_count()}


# -- against open_clip's own trainer --------------------------------------------------------------
OPEN_CLIP_LAUNCH = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)
# open_clip's progress line: epoch, samples so far in the epoch, mean step time since its last line.
EPOCH_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*Batch \(t\): ([0-9.]+),")


def bench_vs_open_clip(args) -> dict:
    """clip-tao's trainer against open_clip's (``open_clip_train.main``) on the same architecture and data.

    ``tiny-clip`` (an open_clip config, registered with open_clip for its run), ``data/demo/train`` (a CSV for
    open_clip), the quickstart's optimiser, loss, crop scale and fp32, the same batch, epochs and loader
    workers; each trainer in its own process, as its users start it. Samples/s of each epoch's training loop
    (loader start-up included: neither keeps workers between epochs), median over the epochs after the first.
    open_clip's epoch time is read from its own log, at its default interval: each line gives the mean step
    time since the previous line and how many samples the epoch has seen.
    """
    import importlib.util
    import tempfile

    if importlib.util.find_spec("open_clip_train") is None or importlib.util.find_spec("pandas") is None:
        raise SystemExit("vs-open-clip needs open_clip's trainer and pandas: pip install -e '.[bench]'")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    images = os.path.join(repo, "data", "demo", "train", "images")
    captions = os.path.join(repo, "data", "demo", "train", "captions")
    with open(os.path.join(repo, "clip_tao", "models", "configs", "tiny-clip.json"), encoding="utf-8") as f:
        arch = json.load(f)["config"]
    with tempfile.TemporaryDirectory() as out:
        config = os.path.join(out, "tiny-clip.json")
        with open(config, "w", encoding="utf-8") as f:
            json.dump(
                {"embed_dim": arch["embed_dim"], "vision_cfg": arch["vision_cfg"], "text_cfg": arch["text_cfg"]}, f
            )
        table = os.path.join(out, "train.csv")
        with open(table, "w", encoding="utf-8") as f:
            f.write("filepath\ttitle\n")
            for name in sorted(os.listdir(images)):
                with open(os.path.join(captions, os.path.splitext(name)[0] + ".txt"), encoding="utf-8") as c:
                    f.write(f"{os.path.join(images, name)}\t{c.read().strip()}\n")
        started = time.perf_counter()
        open_clip_args = [
            "--train-data", table, "--dataset-type", "csv", "--model", "tiny-clip", "--batch-size", str(args.batch),
            "--epochs", str(args.epochs), "--workers", str(args.workers), "--precision", "fp32", "--lr", "1e-3",
            "--wd", "0.05", "--warmup", "30", "--aug-cfg", "scale=(0.8,1.0)", "--save-frequency", "0",
            "--zeroshot-frequency", "0", "--logs", out, "--name", "open_clip", "--seed", "0",
        ]  # fmt: skip
        _run_or_explain([sys.executable, "-c", OPEN_CLIP_LAUNCH, config, *open_clip_args], cwd=out)
        open_clip_seconds = time.perf_counter() - started
        seen: dict[int, tuple[int, float]] = {}  # epoch -> (samples, seconds) so far
        with open(os.path.join(out, "open_clip", "out.log"), encoding="utf-8") as f:
            for match in filter(None, map(EPOCH_LINE.search, f)):
                epoch, samples, mean_step = int(match[1]), int(match[2]), float(match[3])
                before, seconds = seen.get(epoch, (0, 0.0))
                seen[epoch] = (samples, seconds + mean_step * (samples - before) / args.batch)
        if not seen:
            raise SystemExit("no 'Train Epoch' line in open_clip's out.log: has its log format changed?")
        open_clip_rates = [samples / seconds for _, (samples, seconds) in sorted(seen.items())]

        started = time.perf_counter()
        results = os.path.join(out, "clip_tao")
        overrides = [f"results_dir={results}", f"train.num_epochs={args.epochs}",
                     f"dataset.train.batch_size={args.batch}", f"dataset.train.num_workers={args.workers}",
                     f"train.validation_interval={args.epochs}", f"train.checkpoint_interval={args.epochs}"]  # fmt: skip
        _run_or_explain(
            [sys.executable, "-m", "clip_tao.cli", "train", "-e", "specs/quickstart.yaml", *overrides], cwd=repo
        )
        clip_tao_seconds = time.perf_counter() - started
        with open(os.path.join(results, "train", "status.json"), encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        clip_tao_rates = []
        for line in lines:  # one RUNNING line an epoch, with TAO's progress fields
            if line.get("status") == "RUNNING" and "time_per_step" in line:
                clip_tao_rates.append(args.batch / _seconds(line["time_per_step"]))

    if not clip_tao_rates:
        raise SystemExit("no epoch line with time_per_step in clip-tao's status.json")

    def summary(rates: list[float], seconds: float) -> dict:
        steady = rates[1:] or rates
        return {"samples_per_s_per_epoch": [round(r, 1) for r in rates],
                "samples_per_s": round(statistics.median(steady), 1), "process_seconds": round(seconds, 1)}  # fmt: skip

    ours, theirs = summary(clip_tao_rates, clip_tao_seconds), summary(open_clip_rates, open_clip_seconds)
    return {"benchmark": "vs-open-clip", "model": "tiny-clip", "batch": args.batch, "epochs": args.epochs,
            "workers": args.workers, "clip_tao": ours, "open_clip_train": theirs,
            "clip_tao_vs_open_clip": round(ours["samples_per_s"] / theirs["samples_per_s"], 2),
            "load_average": os.getloadavg()}  # fmt: skip


def _run_or_explain(command: list[str], cwd: str) -> None:
    """Run ``command``; on failure stop with the end of its error output."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-2000:]}")


def _seconds(timedelta_text: str) -> float:
    """Seconds of Python's ``str(timedelta)`` (``[D day[s], ]H:MM:SS[.ffffff]``), as status.json writes it."""
    days, _, clock = timedelta_text.rpartition(", ")
    hours, minutes, seconds = clock.split(":")
    return int(days.split()[0] if days else 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


# -- data -------------------------------------------------------------------------------------------
def _make_images(folder: str, n: int, source_size: int) -> list[str]:
    """``n`` photo-like JPEGs (smooth gradients and noise) with captions, written once and reused."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        paths.append(path)
        if os.path.exists(path):
            continue
        y, x = np.mgrid[0:source_size, 0:source_size] / source_size
        base = np.stack([x * rng.uniform(50, 255), y * rng.uniform(50, 255), (x + y) * rng.uniform(20, 120)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        with open(path[:-4] + ".txt", "w") as f:
            f.write(f"a synthetic photo number {i} with a colour gradient")
    return paths


def _write_shards(folder: str, paths: list[str], per_shard: int) -> None:
    import webdataset

    if os.path.isdir(folder) and os.listdir(folder):
        return
    os.makedirs(folder, exist_ok=True)
    with webdataset.ShardWriter(os.path.join(folder, "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for path in paths:
            with open(path, "rb") as f, open(path[:-4] + ".txt", "rb") as c:
                sink.write({"__key__": os.path.basename(path)[:-4], "jpg": f.read(), "txt": c.read()})


def _rate(batches, n_batches: int, batch: int) -> float:
    """samples/s over ``n_batches`` batches after the first (which pays for worker start-up)."""
    iterator = iter(batches)
    next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(n_batches - 1):
        count += len(next(iterator)["pixels"])
    return count / (time.perf_counter() - start)


def _train_data_config(args, root: str, kind: str, workers: int):
    """The training data section for the generated images (``custom``) or shards (``wds``) under ``root``."""
    from clip_tao.config.schema import DatasetConfig, DatasetEntry, WdsConfig

    cfg = DatasetConfig(seed=0, pin_memory=False)
    cfg.train.type = kind
    cfg.train.batch_size = args.batch
    cfg.train.num_workers = workers
    cfg.train.datasets = [DatasetEntry(os.path.join(root, "images"))]
    cfg.train.wds = WdsConfig(root_dir=os.path.join(root, "shards"), samples_per_shard=args.per_shard)
    return cfg


def _loader_rate(cfg, preprocess, tokenizer, n_batches: int) -> float:
    """Samples/s of clip-tao's training loader for ``cfg`` over at most ``n_batches`` batches."""
    from clip_tao.data.loaders import build_train_loader

    bundle = build_train_loader(cfg, preprocess, tokenizer)
    bundle.set_epoch(0)
    return _rate(bundle.loader, min(n_batches, len(bundle.loader)), cfg.train.batch_size)


def bench_data(args) -> dict:
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from clip_tao.config.schema import DatasetConfig
    from clip_tao.data.transforms import build_train_transform
    from clip_tao.models import create_model
    from clip_tao.models.base import Preprocess

    torch.set_num_threads(1)
    root = args.dir
    paths = _make_images(os.path.join(root, "images"), args.n, args.source_size)
    _write_shards(os.path.join(root, "shards"), paths, args.per_shard)
    tokenizer = create_model("tiny-clip", pretrained=False).tokenizer
    preprocess = Preprocess(image_size=args.size)
    n_batches = args.n // args.batch

    # The baseline: the same augmentation written directly with PIL + torchvision, one process.
    cfg = DatasetConfig()
    probability, *jitter = cfg.augmentation.color_jitter
    baseline = T.Compose([
        T.RandomResizedCrop(args.size, scale=tuple(cfg.augmentation.scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(*jitter)], p=probability),
        T.RandomGrayscale(p=cfg.augmentation.grayscale),
        T.ToTensor(),
        T.Normalize(preprocess.mean, preprocess.std),
    ])  # fmt: skip
    assert len(build_train_transform(preprocess, cfg.augmentation).transforms) == len(baseline.transforms)

    def plain():
        for start in range(0, len(paths) - args.batch + 1, args.batch):
            images, captions = [], []
            for path in paths[start : start + args.batch]:
                with Image.open(path) as image:
                    images.append(baseline(image.convert("RGB")))
                with open(path[:-4] + ".txt") as f:
                    captions.append(f.read().strip())
            yield {"pixels": torch.stack(images), "input_ids": tokenizer(captions)}

    result = {"benchmark": "data", "images": args.n, "source_size": args.source_size, "size": args.size,
              "batch": args.batch, "baseline_samples_per_s": round(_rate(plain(), n_batches, args.batch), 1)}  # fmt: skip
    for kind in ("custom", "wds"):
        for workers in args.workers:
            rate = _loader_rate(_train_data_config(args, root, kind, workers), preprocess, tokenizer, n_batches)
            result[f"{kind}_{workers}_workers_samples_per_s"] = round(rate, 1)
            result[f"{kind}_{workers}_workers_per_worker_vs_baseline"] = round(
                rate / max(workers, 1) / result["baseline_samples_per_s"], 2
            )
    if args.naflex_patches:
        result["naflex"] = _bench_naflex_data(args, root, tokenizer, n_batches, result)
    return result


# -- serve ----------------------------------------------------------------------------------------
def _start_server(spec: str, overrides: list[str], log_path: str) -> tuple[subprocess.Popen, int]:
    """``clip-tao serve`` on 127.0.0.1 and a free port, once it answers ``/v2/health/ready``."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "clip_tao", "serve", "-e", spec, "serve.host=127.0.0.1", f"serve.port={port}"]
    log = open(log_path, "w")  # noqa: SIM115 - the child keeps writing to it
    process = subprocess.Popen([*command, *overrides], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server was not ready in 180 s; see {log_path}")


def _drive(port: int, kind: str, clients: int, requests: int, image_size: int) -> dict:
    """``requests`` single-item requests from ``clients`` concurrent tritonclient clients; latency and throughput."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import tritonclient.http as triton

    model = "clip_text" if kind == "text" else "clip_image"
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, image_size, image_size)).astype(np.float32)

    def one_client(index: int) -> list[float]:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
        latencies = []
        for i in range(index, requests, clients):
            if kind == "text":
                tensor = triton.InferInput("text", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[f"a photo of thing number {i}".encode()]], dtype=object))
            else:
                tensor = triton.InferInput("image", list(pixels.shape), "FP32")
                tensor.set_data_from_numpy(pixels)
            start = time.perf_counter()
            client.infer(model, [tensor])
            latencies.append(time.perf_counter() - start)
        client.close()
        return latencies

    one_client(0) if requests > clients else None  # warm-up outside the timing
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(one_client, range(clients)) for x in part]
    wall = time.perf_counter() - start
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    (stats,) = client.get_inference_statistics(model)["model_stats"]
    client.close()
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_batch": round(stats["inference_count"] / max(stats["execution_count"], 1), 2),
    }


def bench_serve(args) -> dict:
    """``clip-tao serve`` with dynamic batching on and off, driven by N concurrent clients on 127.0.0.1."""
    import tempfile

    import yaml

    from clip_tao.io.tables import format_table
    from clip_tao.models import create_model

    folder = tempfile.mkdtemp(prefix="clip_tao_bench_serve_")
    if args.openclip_arch:  # the server process cannot see a type registered here: serve an ONNX export of it
        from clip_tao.deploy.onnx_export import export_onnx

        args.model = register_openclip_arch(args.openclip_arch)
        args.onnx_file = os.path.join(folder, "export", "clip.onnx")
        export_onnx(create_model(args.model, pretrained=False).eval(), args.onnx_file, encoder_type="separate")
        args.onnx_file = os.path.join(folder, "export", "clip_vision.onnx")
    image_size = create_model(args.model, pretrained=False).image_size
    spec = os.path.join(folder, "spec.yaml")
    serve = {"max_batch_size": args.max_batch, "max_queue_delay_ms": args.delay_ms}
    if args.onnx_file:
        serve["onnx_file"] = args.onnx_file
    with open(spec, "w") as f:
        yaml.safe_dump(
            {"results_dir": os.path.join(folder, "results"), "model": {"type": args.model}, "serve": serve}, f
        )
    results, rows = {}, []
    for batching in ("on", "off"):
        log_path = os.path.join(folder, f"server_{batching}.log")
        process, port = _start_server(spec, [f"serve.dynamic_batching={batching == 'on'}"], log_path)
        try:
            for kind in args.kinds:
                r = _drive(port, kind, args.clients, args.requests, image_size)
                results[f"{kind}_batching_{batching}"] = r
                rows.append(
                    [kind, batching, r["requests"], r["requests_per_s"], r["p50_ms"], r["p99_ms"], r["mean_batch"]]
                )
        finally:
            process.terminate()
            process.wait(60)
    print(f"\nclip-tao serve, {args.model} ({'ONNX Runtime' if args.onnx_file else 'PyTorch'}), {args.clients} clients, "
          f"max_batch_size {args.max_batch}, max_queue_delay_ms {args.delay_ms}")  # fmt: skip
    print(format_table(["input", "batching", "requests", "requests/s", "p50 ms", "p99 ms", "mean batch"], rows))
    return {"model": args.model, "clients": args.clients, **results}


def _transform_ms(preprocess, root: str, count: int = 64) -> float:
    """Milliseconds a sample of the training transform (defaults of ``dataset.augmentation``), after a warm-up."""
    import glob

    from PIL import Image

    from clip_tao.config.schema import AugmentationConfig
    from clip_tao.data.transforms import build_train_transform

    transform = build_train_transform(preprocess, AugmentationConfig())
    images = []
    for path in sorted(glob.glob(os.path.join(root, "images", "*.jpg")))[:count]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    for image in images[:8]:
        transform(image)
    start = time.perf_counter()
    for image in images:
        transform(image)
    return round((time.perf_counter() - start) / len(images) * 1e3, 2)


def _bench_naflex_data(args, root: str, tokenizer, n_batches: int, fixed: dict) -> dict:
    """The NaFlex training loaders on the same files: samples/s, and the share of patch slots that is padding."""
    from clip_tao.data.loaders import build_train_loader
    from clip_tao.models.base import Preprocess

    budget = args.naflex_patches
    preprocess = Preprocess(args.size, (0.5,) * 3, (0.5,) * 3, "bilinear", "squash", patch_size=16,
                            max_num_patches=budget)  # fmt: skip
    out: dict = {"max_num_patches": budget, "patch_size": 16}
    # The per-sample transforms alone, in this process (the loader figures also carry worker scheduling noise).
    out["transform_ms_a_sample"] = {
        "fixed_size": _transform_ms(Preprocess(image_size=args.size), root),
        "naflex": _transform_ms(preprocess, root),
    }
    for kind in ("custom", "wds"):
        for workers in args.workers:
            rate = _loader_rate(_train_data_config(args, root, kind, workers), preprocess, tokenizer, n_batches)
            out[f"{kind}_{workers}_workers_samples_per_s"] = round(rate, 1)
            out[f"{kind}_{workers}_workers_per_worker"] = round(rate / max(workers, 1), 1)
            out[f"{kind}_{workers}_workers_vs_fixed_size"] = round(
                rate / fixed[f"{kind}_{workers}_workers_samples_per_s"], 2
            )
    # Padding, over one epoch of the custom loader: what each sample really has, and what its batch pads to.
    counts, padded = [], 0
    cfg = _train_data_config(args, root, "custom", max(args.workers))
    bundle = build_train_loader(cfg, preprocess, tokenizer)
    bundle.set_epoch(0)
    for batch in bundle.loader:
        real = batch["pixels"].pixel_attention_mask.sum(1).tolist()
        counts += real
        padded += len(real) * batch["pixels"].num_patches
    total = sum(counts)
    grouped = 0  # batches cut from samples sorted by patch count, within windows of 16 batches
    window = 16 * args.batch
    for start in range(0, len(counts), window):
        ordered = sorted(counts[start : start + window])
        for b in range(0, len(ordered), args.batch):
            chunk = ordered[b : b + args.batch]
            grouped += len(chunk) * max(chunk)
    out.update({
        "mean_patches_a_sample": round(total / len(counts), 1),
        "min_patches_a_sample": min(counts),
        "padding_to_batch_longest": round(1 - total / padded, 4),
        "padding_to_budget": round(1 - total / (len(counts) * budget), 4),
        "padding_if_grouped_by_patch_count": round(1 - total / grouped, 4),
    })  # fmt: skip
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_eval_child":
        mode, n, per, dim, chunk = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(_eval_child(mode, n, per, dim, chunk, sys.argv[7], sys.argv[8])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="training samples/s")
    t.add_argument("--model", default="tiny-clip")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--loss", default="siglip", choices=["siglip", "clip"])
    t.add_argument("--accumulate", type=int, default=1, help="micro-batches a step (features cached, as training)")
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    t.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    t.add_argument("--openclip-arch", help="use one of open_clip's architectures instead, e.g. ViT-B-32 (random init)")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--no-fused", action="store_true", help="foreach AdamW instead of the fused one chosen on CUDA")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile)")
    t.add_argument("--no-fast-math", action="store_true", help="keep fp32 matrix products in full fp32 (no TF32)")
    t.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU (default: table / measured)")
    m = sub.add_parser("embed", help="embedding throughput: PyTorch eager, torch.compile, ONNX Runtime, TensorRT")
    m.add_argument("--model", default="tiny-clip")
    m.add_argument("--openclip-arch", help="use one of open_clip's architectures instead, e.g. ViT-B-32 (random init)")
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--iters", type=int, default=20)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    m.add_argument("--no-onnx", action="store_true", help="PyTorch only (no ONNX Runtime / TensorRT rows)")
    m.add_argument("--no-compile", action="store_true", help="no torch.compile row")
    m.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast of PyTorch runs")
    m.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU (default: table / measured)")
    e = sub.add_parser("eval", help="exact chunked retrieval metrics: time and memory against the bare product")
    e.add_argument("--n", type=int, default=20000, help="images = captions")
    e.add_argument("--dim", type=int, default=1152)
    e.add_argument("--chunk", type=int, default=0, help="captions a block (0: the library's default)")
    e.add_argument("--dense-n", type=int, default=0, help="also run dense vs chunked at this size (0: skip)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--captions-per-image", type=int, default=1, help="5 for a COCO-shaped set")
    e.add_argument(
        "--counting",
        nargs="+",
        default=["eager"],
        choices=["eager", "compiled"],
        help="how the metrics count each block (clip_tao.metrics.COUNTING); each in its own process",
    )
    o = sub.add_parser("vs-open-clip", help="clip-tao's trainer against open_clip_train on tiny-clip and data/demo")
    o.add_argument("--batch", type=int, default=32)
    o.add_argument("--epochs", type=int, default=6)
    o.add_argument("--workers", type=int, default=2)
    q = sub.add_parser("quickstart", help="wall time of the quickstart training, OMP_NUM_THREADS unset and set")
    q.add_argument("--threads", nargs="+", default=["unset", "1"], help="OMP_NUM_THREADS values ('unset')")
    d = sub.add_parser("data", help="training loaders (custom, wds) against plain PIL + torchvision, samples/s")
    d.add_argument("--n", type=int, default=1024, help="generated images")
    d.add_argument("--source-size", type=int, default=384, help="side of the generated JPEGs")
    d.add_argument("--size", type=int, default=224, help="the model's input size")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--per-shard", type=int, default=128)
    d.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    d.add_argument("--dir", default="/tmp/clip_tao_bench_data", help="where the images and shards are written")
    d.add_argument("--naflex-patches", type=int, default=256, help="NaFlex patch budget (0: skip the NaFlex runs)")
    v = sub.add_parser("serve", help="clip-tao serve on 127.0.0.1: throughput and p50/p99 latency, batching on and off")
    v.add_argument("--model", default="tiny-clip")
    v.add_argument("--onnx-file", help="serve this exported file (ONNX Runtime) instead of the PyTorch model")
    v.add_argument(
        "--openclip-arch", help="export one of open_clip's architectures (random init), serve it with ONNX Runtime"
    )
    v.add_argument("--clients", type=int, default=16)
    v.add_argument("--requests", type=int, default=2000, help="requests a measurement (one item each)")
    v.add_argument("--kinds", nargs="+", default=["text", "image"], choices=["text", "image"])
    v.add_argument("--max-batch", type=int, default=32)
    v.add_argument("--delay-ms", type=float, default=5.0)
    args = parser.parse_args()
    benches = {"train": bench_train, "embed": bench_embed, "eval": bench_eval, "data": bench_data,
               "serve": bench_serve, "quickstart": bench_quickstart, "vs-open-clip": bench_vs_open_clip}  # fmt: skip
    result = benches[args.what](args)
    result["machine"] = machine()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

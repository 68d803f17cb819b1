"""The measuring core every benchmark shares: the machine, peaks, FLOP counts, rates and model builders."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(SCRIPTS)
ENTRY = os.path.join(SCRIPTS, "benchmark.py")  # the command line; benchmarks that measure in a fresh process call it


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
    rate = repeat_rate(lambda: a @ b, seconds, torch.cuda.synchronize if device.type == "cuda" else None)
    best = (2 * size**3 * rate / 1e12, "PyTorch")
    if device.type == "cpu" and dtype == torch.float32:
        with contextlib.suppress(ImportError):
            run = onnxruntime_matmul(size, torch.get_num_threads())
            best = max(best, (2 * size**3 * repeat_rate(lambda: run(a.numpy(), b.numpy()), seconds) / 1e12,
                              "ONNX Runtime"))  # fmt: skip
    return best


def repeat_rate(fn, seconds: float, synchronize=None) -> float:
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


def onnxruntime_matmul(size: int, threads: int):
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
        if SCRIPTS not in sys.path:
            sys.path.insert(0, SCRIPTS)
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


# -- open_clip architectures ----------------------------------------------------------------------------------------
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


# -- processes -------------------------------------------------------------------------------------
def run_or_explain(command: list[str], cwd: str) -> None:
    """Run ``command``; on failure stop with the end of its error output."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-2000:]}")


def status_seconds(timedelta_text: str) -> float:
    """Seconds of Python's ``str(timedelta)`` (``[D day[s], ]H:MM:SS[.ffffff]``), as status.json writes it."""
    days, _, clock = timedelta_text.rpartition(", ")
    hours, minutes, seconds = clock.split(":")
    return int(days.split()[0] if days else 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)

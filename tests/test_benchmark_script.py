"""The measuring core of ``scripts/benchmark.py`` (``scripts/benchmarks/core.py``): what its MFU figures are built
from, and that every benchmark module plugs into the command line."""

import importlib
import subprocess
import sys
from datetime import timedelta

import torch

from tests.conftest import REPO


def _benchmark():
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module("benchmarks.core")


def test_every_benchmark_is_a_sub_command_of_the_entry_point():
    _benchmark()
    from benchmarks import MODULES

    listing = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in MODULES:
        module = importlib.import_module(f"benchmarks.{name}")
        assert module.NAME in listing and callable(module.run) and module.__doc__


def test_flops_of_inference_include_open_clips_attention_and_its_projections():
    """The reference is PyTorch's own counter on the math attention backend (plain matrix products it counts)
    with gradients on (no fused MultiheadAttention operator). The benchmark's count of the fast path (the
    fused inference operator, the CPU's flash attention) must equal it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clip_tao.models import create_model

    bench = _benchmark()
    model = create_model("tiny-clip", pretrained=False).eval()
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as reference:
        model.encode_image(pixels)
    with torch.no_grad():
        counted = bench.count_flops(lambda: model.encode_image(pixels))
    assert counted == reference.get_total_flops() > 0
    assert torch.backends.mha.get_fastpath_enabled()  # restored for the timed runs


def test_flops_of_a_training_step_include_the_attention_backward():
    from torch.utils.flop_counter import FlopCounterMode

    from clip_tao.models import create_model

    bench = _benchmark()
    model = create_model("tiny-clip", pretrained=False)
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    with FlopCounterMode(display=False) as plain:  # the CPU's flash attention unseen
        model.encode_image(pixels).sum().backward()
    counted = bench.count_flops(lambda: model.encode_image(pixels).sum().backward())
    assert counted > plain.get_total_flops()


def test_cpu_peak_is_a_measured_gemm_rate_and_names_its_library():
    bench = _benchmark()
    rate, library = bench.measured_gemm_tflops(torch.device("cpu"), "fp32", size=256, seconds=0.05)
    assert rate > 0 and library in ("PyTorch", "ONNX Runtime")
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    product = bench.onnxruntime_matmul(64, 1)(a.numpy(), b.numpy())[0]
    torch.testing.assert_close(torch.from_numpy(product), a @ b, rtol=1e-4, atol=1e-4)


def test_status_json_durations_read_back():
    bench = _benchmark()
    for seconds in (0.25, 61.5, 3 * 86400 + 5.000001, 86400):
        assert abs(bench.status_seconds(str(timedelta(seconds=seconds))) - seconds) < 1e-6

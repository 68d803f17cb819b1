"""The measuring helpers of ``scripts/benchmark.py``: what its MFU figures are built from."""

import importlib.util
from datetime import timedelta

import torch

from tests.conftest import REPO


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_of_inference_include_open_clips_attention_projections():
    """In eval mode without gradients nn.MultiheadAttention runs one fused operator that FlopCounterMode does
    not count; with gradients it runs the plain products. Both must give the same count."""
    from clip_tao.models import create_model

    bench = _benchmark()
    model = create_model("tiny-clip", pretrained=False).eval()
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        inference = bench.count_flops(lambda: model.encode_image(pixels))
    with torch.enable_grad():
        plain = bench.count_flops(lambda: model.encode_image(pixels))
    assert inference == plain > 0
    assert torch.backends.mha.get_fastpath_enabled()  # restored for the timed runs


def test_cpu_peak_is_a_measured_gemm_rate_and_names_its_library():
    bench = _benchmark()
    rate, library = bench.measured_gemm_tflops(torch.device("cpu"), "fp32", size=256, seconds=0.05)
    assert rate > 0 and library in ("PyTorch", "ONNX Runtime")


def test_status_json_durations_read_back():
    bench = _benchmark()
    for seconds in (0.25, 61.5, 3 * 86400 + 5.000001, 86400):
        assert abs(bench._seconds(str(timedelta(seconds=seconds))) - seconds) < 1e-6

"""The PyTorch and ONNX Runtime evaluations of one trained model give the same figures on the demo set, and
the mixed-precision fp16 file the same recall figures.

The demo's validation captions repeat ("a red circle" ...): twin captions have identical embeddings in
each backend, so only a ranking that takes every score from the same computation agrees across them.
"""

import json
import math

import pytest

from clip_tao.cli import main
from tests.conftest import REPO


def test_pytorch_and_onnxruntime_figures_match_on_the_demo_set(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the quickstart spec names data/demo relative to the repository
    spec = ["-e", "specs/quickstart.yaml", f"results_dir={tmp_path}", "dataset.train.num_workers=0",
            "dataset.val.num_workers=0", "evaluate.num_workers=0"]  # fmt: skip
    assert main(["train", *spec, "train.num_epochs=2", "train.validation_interval=2"]) == 0
    best = tmp_path / "train" / "clip_best.pth"
    onnx_file, fp16_file = tmp_path / "export" / "clip.onnx", tmp_path / "export_fp16" / "clip.onnx"
    assert main(["export", *spec, f"export.checkpoint={best}", f"export.onnx_file={onnx_file}"]) == 0
    export_fp16 = [f"export.checkpoint={best}", f"export.onnx_file={fp16_file}", "export.data_type=fp16"]
    assert main(["export", *spec, *export_fp16]) == 0
    figures = {}
    for backend, override in (
        ("pytorch", f"evaluate.checkpoint={best}"),
        ("onnxruntime", f"evaluate.onnx_file={onnx_file}"),
        ("onnxruntime-fp16", f"evaluate.onnx_file={fp16_file}"),
    ):
        assert main(["evaluate", *spec, override]) == 0
        results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
        figures[backend] = {k: v for k, v in results.items() if k.startswith(("i2t_", "t2i_"))}
    assert figures["pytorch"]["i2t_R@1"] < 100 and all(math.isfinite(v) for v in figures["pytorch"].values())
    assert figures["onnxruntime"] == figures["pytorch"]
    # The mixed-precision file gives the same recall figures and median ranks. Its embeddings differ from
    # fp32 ones by ~1e-4 (cosine >= 0.9999), enough to swap a near-tied pair deep in a ranking: the figures
    # that average over every rank (mAP, mean rank, AUC) may move by those few swaps, and no more.
    fp16, fp32 = figures["onnxruntime-fp16"], figures["pytorch"]
    assert fp16.keys() == fp32.keys()
    averaged = {"mAP": 0.05, "MeanR": 0.05, "AUC": 1e-3}  # a swapped pair among 100 queries moves them less
    for key, value in fp32.items():
        tolerance = averaged.get(key.split("_", 1)[1])
        assert fp16[key] == (value if tolerance is None else pytest.approx(value, abs=tolerance)), key

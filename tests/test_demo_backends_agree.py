"""The PyTorch and ONNX Runtime evaluations (fp32 and mixed-precision fp16 files) of one trained model give
the same figures on the demo set.

The demo's validation captions repeat ("a red circle" ...): twin captions have identical embeddings in
each backend, so only a ranking that takes every score from the same computation agrees across them.
"""

import json
import math

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
    # The mixed-precision file ranks the demo set exactly as PyTorch's fp32 model does.
    assert figures["onnxruntime-fp16"] == figures["pytorch"]

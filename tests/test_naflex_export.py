"""NaFlex export: one ONNX graph taking the patch sequence (batch and patch count dynamic), run by ONNX Runtime
on transformers' processor output and compared with ``Siglip2Model``, and the ONNX Runtime backend fed by
our data pipeline from the budget recorded in the deploy config."""

from __future__ import annotations

import h5py
import onnx
import pytest
import torch
import yaml

from clip_tao.cli import main
from clip_tao.deploy.onnx_export import export_onnx
from clip_tao.deploy.ort_backend import OnnxRuntimeEncoder
from clip_tao.models import create_model
from clip_tao.models.patches import PatchBatch
from tests.family_assets import make_gemma_tokenizer, make_naflex_folder
from tests.test_naflex_pipeline import blob, naflex_spec

TYPE = "siglip2-so400m-patch16-naflex"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("naflex_export")
    make_gemma_tokenizer(root / "gemma")
    return make_naflex_folder(root / "model", root / "gemma")


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("encoder_type", ["combined", "separate"])
def test_patch_sequence_graph_matches_siglip2_on_the_processor_output(tmp_path, model_folder, encoder_type):
    from transformers import Siglip2ImageProcessor, Siglip2Model

    model = create_model(TYPE, pretrained_path=str(model_folder), max_num_patches=24)
    report = export_onnx(model, str(tmp_path / "clip.onnx"), encoder_type=encoder_type)
    assert max(report.max_abs_diff.values()) <= 1e-4
    vision_file = tmp_path / ("clip.onnx" if encoder_type == "combined" else "clip_vision.onnx")
    graph = onnx.load(vision_file).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["pixel_values", "pixel_attention_mask", "spatial_shapes"]
    assert _dims(graph.input[0]) == ["image_batch", "num_patches", 8 * 8 * 3]
    assert _dims(graph.input[1]) == ["image_batch", "num_patches"] and _dims(graph.input[2]) == ["image_batch", 2]
    deploy = yaml.safe_load((tmp_path / "clip_config.yaml").read_text())["deploy"]
    assert (deploy["patch_size"], deploy["max_num_patches"]) == (8, 24)

    # The processor's own output (padded to its budget, a budget other than the traced one) through ONNX Runtime.
    encoder = OnnxRuntimeEncoder(str(vision_file))
    assert encoder.preprocess.naflex and encoder.preprocess.max_num_patches == 24
    images = [blob(i)[0] for i in range(5)]
    reference = Siglip2Model.from_pretrained(str(model_folder)).eval()
    for budget in (24, 60):
        inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=budget)(images, return_tensors="pt")
        with torch.no_grad():
            want = reference.get_image_features(**inputs)
            want = torch.nn.functional.normalize(getattr(want, "pooler_output", want), dim=-1)
        got = encoder.encode_image(
            PatchBatch(inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
        )
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if encoder_type == "combined":
        ids = model.tokenizer(["a red blob on green", "a blue blob"])
        with torch.no_grad():
            torch.testing.assert_close(encoder.encode_text(ids), model.encode_text(ids), atol=1e-5, rtol=0)


def test_fp16_patch_sequence_graph_matches_siglip2_fp32(tmp_path, model_folder):
    """export.data_type=fp16 of a NaFlex model (its position-table Resize kept fp32), on the processor's output."""
    from transformers import Siglip2ImageProcessor, Siglip2Model

    from clip_tao.deploy.mixed_precision import file_data_type

    model = create_model(TYPE, pretrained_path=str(model_folder), max_num_patches=24)
    report = export_onnx(model, str(tmp_path / "clip.onnx"), encoder_type="separate", data_type="fp16")
    assert min(report.min_cosine.values()) >= 0.9999
    assert file_data_type(str(tmp_path / "clip_vision.onnx")) == "fp16"
    encoder = OnnxRuntimeEncoder(str(tmp_path / "clip_vision.onnx"))
    reference = Siglip2Model.from_pretrained(str(model_folder)).eval()
    images = [blob(i)[0] for i in range(5)]
    for budget in (24, 60):
        inputs = Siglip2ImageProcessor(patch_size=8, max_num_patches=budget)(images, return_tensors="pt")
        with torch.no_grad():
            want = reference.get_image_features(**inputs)
            want = torch.nn.functional.normalize(getattr(want, "pooler_output", want), dim=-1)
        got = encoder.encode_image(
            PatchBatch(inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
        )
        assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.9999, budget


def test_the_naflex_spec_trains_exports_and_embeds_the_same_with_onnx_runtime(tmp_path, model_folder, monkeypatch):
    """specs/siglip2_naflex.yaml as written, given tiny weights and data (paths and sizes overridden)."""
    from tests.conftest import REPO
    from tests.test_naflex_pipeline import make_blobs

    monkeypatch.chdir(REPO)
    train, val = make_blobs(tmp_path / "train", 16, seed=1), make_blobs(tmp_path / "val", 6, seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red blob on green\nA Blue Blob, on yellow!\n", encoding="utf-8")
    overrides = [
        f"results_dir={tmp_path / 'results'}", f"model.pretrained_path={model_folder}", "model.max_num_patches=20",
        f"dataset.train.datasets=[{{image_dir: {train}}}]", f"dataset.val.datasets=[{{image_dir: {val}}}]",
        "dataset.train.batch_size=8", "dataset.train.num_workers=0", "dataset.val.num_workers=0",
        "train.num_epochs=1", "train.precision=fp32", "train.optim.warmup_steps=1", "train.grad_checkpointing=false",
        f"inference.datasets=[{{image_dir: {val}}}]", f"inference.text_file={prompts}", "inference.num_workers=0",
    ]  # fmt: skip
    spec = "specs/siglip2_naflex.yaml"
    assert main(["train", "-e", spec, *overrides]) == 0
    assert main(["export", "-e", spec, *overrides, "export.on_cpu=true"]) == 0
    onnx_file = tmp_path / "results" / "export" / "siglip2_naflex.onnx"
    embeddings = {}
    for backend, option in (("pytorch", "inference.onnx_file=null"), ("onnx", f"inference.onnx_file={onnx_file}")):
        assert main(["inference", "-e", spec, *overrides, option, f"inference.results_dir={tmp_path / backend}"]) == 0
        for kind in ("image", "text"):
            with h5py.File(tmp_path / backend / f"{kind}_embeddings.h5") as f:
                embeddings[backend, kind] = torch.from_numpy(f["embeddings"][()])
    assert len(embeddings["onnx", "image"]) == 6 and len(embeddings["onnx", "text"]) == 2
    for kind in ("image", "text"):
        torch.testing.assert_close(embeddings["onnx", kind], embeddings["pytorch", kind], atol=1e-4, rtol=0)


def test_tensorrt_refuses_a_patch_sequence_export_in_one_line(tmp_path, model_folder, capsys):
    model = create_model(TYPE, pretrained_path=str(model_folder), max_num_patches=16)
    export_onnx(model, str(tmp_path / "clip.onnx"), encoder_type="separate")
    spec = naflex_spec(tmp_path, model_folder)
    args = [
        f"gen_trt_engine.onnx_file={tmp_path / 'clip_vision.onnx'}",
        f"gen_trt_engine.trt_engine={tmp_path / 'x.engine'}",
    ]
    assert main(["gen_trt_engine", "-e", str(spec), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "TensorRT engines of NaFlex (patch-sequence) exports are not supported" in err[-1]

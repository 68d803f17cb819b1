"""export, the ONNX Runtime backend and the TensorRT entry points (on a machine without TensorRT)."""

import json

import h5py
import numpy as np
import onnx
import pytest
import torch

from clip_tao.cli import main
from clip_tao.config import load_experiment
from clip_tao.deploy.onnx_export import check_exportable, export_onnx
from clip_tao.deploy.ort_backend import OnnxRuntimeEncoder
from clip_tao.errors import ConfigError, ModelError
from clip_tao.models import create_model
from clip_tao.models.tokenizer import load_tokenizer
from tests.retrieval_checks import compare_backends, evaluation_embeddings

TINY = ["tiny-clip", "tiny-siglip2"]


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("model_type", TINY)
@pytest.mark.parametrize("encoder_type", ["combined", "separate"])
def test_export_writes_tao_files_that_match_pytorch(tiny_spec, tmp_path, model_type, encoder_type):
    spec = tiny_spec(model_type)
    onnx_file = tmp_path / "export" / "clip.onnx"
    args = [f"export.onnx_file={onnx_file}", f"export.encoder_type={encoder_type}"]
    assert main(["export", "-e", str(spec), *args]) == 0
    model = create_model(model_type)  # export.checkpoint null -> the type's own weights
    context = model.context_length
    if encoder_type == "combined":
        graph = onnx.load(onnx_file).graph
        assert [i.name for i in graph.input] == ["image", "input_ids", "attention_mask"]
        assert [o.name for o in graph.output] == ["image_embedding", "text_embedding", "logit_scale", "logit_bias"]
        assert _dims(graph.input[0]) == ["image_batch", 3, 64, 64]
        assert _dims(graph.input[1]) == _dims(graph.input[2]) == ["text_batch", context]
        assert _dims(graph.output[0]) == ["image_batch", model.embed_dim]
        encoder = OnnxRuntimeEncoder(str(onnx_file))
    else:
        vision = onnx.load(tmp_path / "export" / "clip_vision.onnx").graph
        text = onnx.load(tmp_path / "export" / "clip_text.onnx").graph
        # TAO 7.0.1's separate vision file (scripts/export.py) outputs the logit scale/bias too.
        assert [i.name for i in vision.input] == ["image"]
        assert [o.name for o in vision.output] == ["image_embedding", "logit_scale", "logit_bias"]
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp_path / "export" / "clip_vision.onnx"))
        _, scale, bias = session.run(None, {"image": np.zeros((2, 3, 64, 64), np.float32)})
        assert scale.item() == pytest.approx(model.logit_scale.exp().item(), rel=1e-6)
        assert bias.item() == pytest.approx(model.logit_bias.item(), abs=1e-6)
        assert [i.name for i in text.input] == ["input_ids", "attention_mask"]
        assert [o.name for o in text.output] == ["text_embedding", "logit_scale", "logit_bias"]
        encoder = OnnxRuntimeEncoder(str(tmp_path / "export" / "clip_vision.onnx"))
    pixels = torch.randn(5, 3, 64, 64)
    ids = model.tokenizer(["a red square", "two blue circles on grass", "x"])
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_image(pixels), model.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(encoder.encode_text(ids), model.encode_text(ids), atol=1e-5, rtol=0)
    # Companions: the spec with the learned logit values and the tokenizer.
    saved = load_experiment(tmp_path / "export" / "clip_config.yaml")
    assert saved.deploy.model_type == model_type and saved.deploy.image_size == 64
    assert saved.model.init_logit_scale == pytest.approx(model.logit_scale.item())
    assert saved.deploy.logit_scale == pytest.approx(model.logit_scale.exp().item())
    tokenizer = load_tokenizer(tmp_path / "export" / "clip_tokenizer")
    assert torch.equal(tokenizer(["a Red square!"]), model.tokenizer(["a Red square!"]))
    lines = (tmp_path / "results" / "export" / "status.json").read_text().splitlines()
    assert json.loads(lines[-1])["kpi"]["max_abs_diff"] < 1e-4


def test_combined_outputs_and_ignored_attention_mask(tmp_path):
    import onnxruntime as ort

    model = create_model("tiny-siglip2", pretrained=False, loss_type="siglip")
    export_onnx(model, str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = model.tokenizer(["one", "two"]).numpy()
    feed = {
        "image": np.random.rand(3, 3, 64, 64).astype(np.float32),
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
    }
    image, text, scale, bias = session.run(None, feed)
    assert image.shape == (3, 32) and text.shape == (2, 32)  # the two batch axes are independent
    assert scale[0] == pytest.approx(10.0, rel=1e-5) and bias[0] == pytest.approx(-10.0)
    zeros = session.run(["text_embedding"], {**feed, "attention_mask": np.zeros_like(ids)})[0]
    np.testing.assert_allclose(zeros, text)  # the mask is accepted and ignored


def test_fixed_batch_and_external_data(tmp_path):
    model = create_model("tiny-clip", pretrained=False)
    report = export_onnx(
        model, str(tmp_path / "m.onnx"), encoder_type="separate", batch_size=4, external_data_threshold=0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m_config.yaml",
        "m_text.onnx",
        "m_text.onnx.data",
        "m_tokenizer",
        "m_vision.onnx",
        "m_vision.onnx.data",
    ]
    assert report.external_data and max(report.max_abs_diff.values()) < 1e-4
    graph = onnx.load(tmp_path / "m_vision.onnx", load_external_data=False).graph
    assert _dims(graph.input[0]) == [4, 3, 64, 64]
    encoder = OnnxRuntimeEncoder(str(tmp_path / "m_text.onnx"))
    ids = model.tokenizer(["a", "b", "c", "d"])
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_text(ids), model.encode_text(ids), atol=1e-5, rtol=0)


def test_export_refuses_to_overwrite(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    target = f"export.onnx_file={tmp_path / 'x.onnx'}"
    assert main(["export", "-e", str(spec), target]) == 0
    before = (tmp_path / "x.onnx").read_bytes()
    assert main(["export", "-e", str(spec), target]) == 1
    assert "already exists: export never overwrites" in capsys.readouterr().err
    assert (tmp_path / "x.onnx").read_bytes() == before
    assert main(["export", "-e", str(spec), target, "export.overwrite=true"]) == 0


def test_export_refuses_sizes_and_dynamic_resolution(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    assert (
        main(
            [
                "export",
                "-e",
                str(spec),
                f"export.onnx_file={tmp_path / 'x.onnx'}",
                "export.input_height=256",
                "export.input_width=256",
            ]
        )
        == 1
    )
    assert "does not fit tiny-clip, which takes 64x64 images" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    model = create_model("tiny-siglip2", pretrained=False)
    model.exportable = False  # what a dynamic-resolution (NaFlex) family declares
    with pytest.raises(ModelError, match="siglip2-so400m-patch16-384"):
        check_exportable(model, 64, 64, 3)
    with pytest.raises(ConfigError, match="must end in .onnx"):
        export_onnx(create_model("tiny-clip", pretrained=False), str(tmp_path / "x.bin"))


def test_onnx_runtime_evaluate_and_inference_match_pytorch(tiny_spec, tmp_path):
    # The generated captions repeat: evaluation encodes each once, so they tie exactly in both backends.
    spec = tiny_spec("tiny-siglip2", train={"num_epochs": 1})
    assert main(["train", "-e", str(spec)]) == 0
    checkpoint = tmp_path / "results" / "train" / "clip_latest.pth"
    onnx_file = tmp_path / "deploy" / "clip.onnx"
    assert (
        main(
            [
                "export",
                "-e",
                str(spec),
                f"export.checkpoint={checkpoint}",
                f"export.onnx_file={onnx_file}",
                "export.encoder_type=separate",
            ]
        )
        == 0
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square\n")
    data = f"inference.datasets=[{{image_dir: {tmp_path / 'data' / 'val'}}}]"
    figures, embeddings, evaluated = {}, {}, {}
    for backend, option in (
        ("pytorch", f"checkpoint={checkpoint}"),
        ("onnx", f"onnx_file={tmp_path / 'deploy' / 'clip_vision.onnx'}"),
    ):
        results_dir = f"results_dir={tmp_path / backend}"
        assert main(["evaluate", "-e", str(spec), results_dir, f"evaluate.{option}"]) == 0
        figures[backend] = json.loads((tmp_path / backend / "evaluate" / "results.json").read_text())
        evaluated[backend] = evaluation_embeddings(spec, [results_dir, f"evaluate.{option}"])
        assert (
            main(
                [
                    "inference",
                    "-e",
                    str(spec),
                    results_dir,
                    f"inference.{option}",
                    f"inference.text_file={prompts}",
                    data,
                ]
            )
            == 0
        )
        with h5py.File(tmp_path / backend / "inference" / "image_embeddings.h5") as f:
            embeddings[backend] = f["embeddings"][()]
    assert figures["onnx"]["backend"] == "onnxruntime"
    if compare_backends(evaluated["pytorch"], evaluated["onnx"]):  # no query within rounding of a tie
        for key, value in figures["pytorch"].items():
            if key.startswith(("i2t_", "t2i_")):
                assert figures["onnx"][key] == pytest.approx(value, abs=1e-9), key
    np.testing.assert_allclose(embeddings["onnx"], embeddings["pytorch"], atol=1e-5)


def test_without_tensorrt_the_message_names_the_cpu_alternative(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    onnx_file = tmp_path / "m.onnx"
    export_onnx(create_model("tiny-clip"), str(onnx_file))
    args = [f"gen_trt_engine.onnx_file={onnx_file}", f"gen_trt_engine.trt_engine={tmp_path / 'm.engine'}"]
    assert main(["gen_trt_engine", "-e", str(spec), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert "TensorRT" in err and "ONNX Runtime backend" in err and "\n" not in err
    assert main(["evaluate", "-e", str(spec), f"evaluate.trt_engine={tmp_path / 'm.engine'}"]) == 1
    assert "ONNX Runtime backend" in capsys.readouterr().err


def test_missing_encoder_file_is_one_line(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    export_onnx(create_model("tiny-clip"), str(tmp_path / "m.onnx"), encoder_type="separate")
    (tmp_path / "m_text.onnx").unlink()
    assert main(["evaluate", "-e", str(spec), f"evaluate.onnx_file={tmp_path / 'm.onnx'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("this task needs the text encoder, but only m_vision.onnx exists; add m_text.onnx")
    assert main(["evaluate", "-e", str(spec), f"evaluate.onnx_file={tmp_path / 'none.onnx'}"]) == 1
    assert "no such file" in capsys.readouterr().err

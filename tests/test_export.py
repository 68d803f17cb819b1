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
    spec = tiny_spec("tiny-siglip2", train={"num_epochs": 1})
    # Unique captions: duplicates tie exactly in PyTorch but only nearly in ONNX Runtime, and ties rank pessimistically.
    for i, caption in enumerate(sorted((tmp_path / "data" / "val").glob("*.txt"))):
        caption.write_text(f"{caption.read_text().strip()} number {i}\n")
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
    figures, embeddings = {}, {}
    for backend, option in (
        ("pytorch", f"checkpoint={checkpoint}"),
        ("onnx", f"onnx_file={tmp_path / 'deploy' / 'clip_vision.onnx'}"),
    ):
        results_dir = f"results_dir={tmp_path / backend}"
        assert main(["evaluate", "-e", str(spec), results_dir, f"evaluate.{option}"]) == 0
        figures[backend] = json.loads((tmp_path / backend / "evaluate" / "results.json").read_text())
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
    for key, value in figures["pytorch"].items():
        if key.startswith(("i2t_", "t2i_")):
            assert figures["onnx"][key] == pytest.approx(value, abs=1e-4), key
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


def _value_types(path) -> dict[str, int]:
    """The element type of every tensor in an ONNX graph, by ONNX's own type inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True)
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]})
    return types


@pytest.mark.parametrize(("model_type", "encoder_type"), [("tiny-clip", "combined"), ("tiny-siglip2", "separate")])
def test_fp16_export_is_mixed_precision_and_matches_pytorch_fp32(tiny_spec, tmp_path, model_type, encoder_type):
    from onnx.reference import ReferenceEvaluator

    from clip_tao.deploy.mixed_precision import FP32_OPS, file_data_type, final_normalisation_nodes

    spec = tiny_spec(model_type)
    onnx_file = tmp_path / "export" / "clip.onnx"
    args = [f"export.onnx_file={onnx_file}", f"export.encoder_type={encoder_type}", "export.data_type=fp16"]
    assert main(["export", "-e", str(spec), *args]) == 0
    model = create_model(model_type).eval()
    files = (
        [onnx_file]
        if encoder_type == "combined"
        else [tmp_path / "export" / f"clip_{e}.onnx" for e in ("vision", "text")]
    )
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for path in files:
        assert file_data_type(str(path)) == "fp16"
        graph = onnx.load(path).graph
        types = _value_types(path)
        # Inputs and outputs keep TAO's types; matrix products compute in fp16 on fp16 weights.
        for value in graph.input:
            assert types[value.name] == (fp32 if value.name == "image" else onnx.TensorProto.INT64)
        assert all(types[v.name] == fp32 for v in graph.output)
        matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
        assert matmuls and all(types[n.input[1]] == fp16 for n in matmuls)
        # LayerNorm, Softmax, reductions and everything after the last projection compute in fp32.
        kept = [n for n in graph.node if n.op_type in FP32_OPS or n.name in final_normalisation_nodes(graph)]
        assert any(n.op_type == "LayerNormalization" for n in kept) and any(n.op_type == "ReduceL2" for n in kept)
        for node in kept:
            names = node.output if node.op_type == "Cast" else [*node.input, *node.output]  # a Cast is the border
            floats = [types[name] for name in names if name and types.get(name) in (fp16, fp32)]
            assert all(t == fp32 for t in floats), (node.op_type, node.name)
    saved = load_experiment(tmp_path / "export" / "clip_config.yaml")
    assert saved.deploy.data_type == "fp16" and saved.export.data_type == "fp16"
    kpi = json.loads((tmp_path / "results" / "export" / "status.json").read_text().splitlines()[-1])["kpi"]
    assert kpi["data_type"] == "fp16" and kpi["min_cosine"] >= 0.9999

    # Other inputs than export verified, through the ONNX Runtime backend and ONNX's reference evaluator
    # (which computes each fp16 node in fp16), each against PyTorch in fp32.
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ids = model.tokenizer(["a red square", "two blue circles on grass", "x", "a red square"])
    with torch.no_grad():
        want_image, want_text = model.encode_image(pixels), model.encode_text(ids)
    encoder = OnnxRuntimeEncoder(str(files[0]))
    got_image, got_text = encoder.encode_image(pixels), encoder.encode_text(ids)
    assert torch.nn.functional.cosine_similarity(got_image, want_image).min() >= 0.9999
    assert torch.nn.functional.cosine_similarity(got_text, want_text).min() >= 0.9999
    assert torch.equal(got_text[0], got_text[3])  # twin captions stay twins
    image_file = files[0]
    feed = {"image": pixels.numpy()}
    if encoder_type == "combined":
        feed.update(input_ids=ids.numpy(), attention_mask=np.ones_like(ids.numpy()))
    reference = ReferenceEvaluator(str(image_file)).run(["image_embedding"], feed)[0]
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(reference), want_image).min() >= 0.9999


def test_fp16_export_refuses_opsets_before_17(tiny_spec, tmp_path, capsys):
    spec = tiny_spec()
    args = [f"export.onnx_file={tmp_path / 'x.onnx'}", "export.data_type=fp16", "export.opset_version=16"]
    assert main(["export", "-e", str(spec), *args]) == 1
    assert "export.data_type=fp16 needs export.opset_version >= 17 (got 16)" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "results" / "export").exists()

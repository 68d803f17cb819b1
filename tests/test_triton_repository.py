"""``export.triton_repository``: config.pbtxt parsed with Triton's own protobuf definitions (from tritonclient),
checked against the ONNX graphs it describes, which ONNX Runtime then runs with the configured names and shapes."""

from __future__ import annotations

import filecmp

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from clip_tao.cli import main
from clip_tao.deploy.files import DeployFiles
from clip_tao.deploy.triton_repository import Sizes, write_triton_repository
from clip_tao.errors import ConfigError

ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
}
NUMPY_TYPES = {
    model_config_pb2.TYPE_FP32: np.float32,
    model_config_pb2.TYPE_FP16: np.float16,
    model_config_pb2.TYPE_INT64: np.int64,
}
# Triton's onnxruntime backend maps optimization.graph.level (its README): unset -> all, -1 -> basic,
# 1 -> basic and extended, 2 -> none.
ORT_LEVELS = {
    0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def _parse(path) -> model_config_pb2.ModelConfig:
    """Triton's parser rejects unknown fields and wrong types, as tritonserver does when it loads the file."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _graph_io(path) -> dict[str, tuple[str, list[int]]]:
    graph = onnx.load(path).graph
    return {
        t.name: (
            ONNX_TO_TRITON[t.type.tensor_type.elem_type],
            [d.dim_value or -1 for d in t.type.tensor_type.shape.dim],
        )
        for t in [*graph.input, *graph.output]
    }


def _check_against_graph(config, model_file, batched: bool) -> None:
    """Every configured tensor exists in the graph with its type and (batch axis aside) its shape."""
    graph = _graph_io(model_file)
    for tensor in [*config.input, *config.output]:
        data_type, shape = graph[tensor.name]
        assert model_config_pb2.DataType.Name(tensor.data_type) == data_type
        assert ([-1, *tensor.dims] if batched and not tensor.name.startswith("logit") else list(tensor.dims)) == shape
    inputs = {t.name for t in onnx.load(model_file).graph.input}
    assert {t.name for t in config.input} == inputs  # Triton must feed every graph input


def _run(config, model_file, batch: int) -> dict[str, np.ndarray]:
    """ONNX Runtime fed and set up exactly as Triton would from the configured inputs and graph level."""
    feed = {}
    for t in config.input:
        dims = [batch if d == -1 else d for d in t.dims]
        shape = [batch, *dims] if config.max_batch_size > 0 else dims
        feed[t.name] = np.ones(shape, NUMPY_TYPES[t.data_type])
    options = ort.SessionOptions()
    options.graph_optimization_level = ORT_LEVELS[config.optimization.graph.level]
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    names = [t.name for t in config.output]
    return dict(zip(names, session.run(names, feed)))


def test_separate_export_writes_two_batched_models(tiny_spec, tmp_path):
    spec = tiny_spec("tiny-clip")
    repo = tmp_path / "triton"
    args = [f"export.onnx_file={tmp_path / 'x' / 'clip.onnx'}", "export.encoder_type=separate"]
    args += [f"export.triton_repository={repo}", "serve.max_batch_size=16", "serve.max_queue_delay_ms=2.5"]
    assert main(["export", "-e", str(spec), *args]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["clip_image", "clip_text"]
    for name, exported in [("clip_image", "clip_vision.onnx"), ("clip_text", "clip_text.onnx")]:
        config = _parse(repo / name / "config.pbtxt")
        model_file = repo / name / "1" / "model.onnx"
        assert filecmp.cmp(model_file, tmp_path / "x" / exported, shallow=False)
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.default_model_filename == "model.onnx"
        assert config.max_batch_size == 16
        assert config.dynamic_batching.max_queue_delay_microseconds == 2500
        _check_against_graph(config, model_file, batched=True)
        for output, array in _run(config, model_file, batch=3).items():
            assert array.shape == (3, *config.output[0].dims), output
    text = _parse(repo / "clip_text" / "config.pbtxt")
    assert [t.name for t in text.input] == ["input_ids", "attention_mask"] and list(text.input[0].dims) == [77]
    assert [t.name for t in text.output] == ["text_embedding"]  # logit scalars have no batch axis to split

    # A second export into the same repository is refused before any work, unless export.overwrite.
    with pytest.raises(ConfigError, match="clip_image already exists.*export.overwrite=true"):
        main(["--debug", "export", "-e", str(spec), *args, f"export.onnx_file={tmp_path / 'y' / 'clip.onnx'}"])
    assert not (tmp_path / "y").exists()
    assert main(["export", "-e", str(spec), *args, "export.overwrite=true"]) == 0


@pytest.mark.parametrize(("encoder_type", "batch_size"), [("combined", -1), ("separate", 2)])
def test_unbatched_models_keep_the_batch_axis_in_their_dims(tiny_spec, tmp_path, encoder_type, batch_size):
    spec = tiny_spec("tiny-siglip2")
    repo = tmp_path / "triton"
    args = [f"export.onnx_file={tmp_path / 'x' / 'm.onnx'}", f"export.encoder_type={encoder_type}"]
    assert (
        main(["export", "-e", str(spec), *args, f"export.batch_size={batch_size}", f"export.triton_repository={repo}"])
        == 0
    )
    names = ["clip"] if encoder_type == "combined" else ["clip_image", "clip_text"]
    assert sorted(p.name for p in repo.iterdir()) == names
    for name in names:
        config = _parse(repo / name / "config.pbtxt")
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        model_file = repo / name / "1" / "model.onnx"
        _check_against_graph(config, model_file, batched=False)
        batch = 2 if batch_size == 2 else 3
        for output, array in _run(config, model_file, batch).items():
            assert array.shape[0] == (1 if output.startswith("logit") else batch)


def test_tensorrt_engines_get_the_tensorrt_platform(tmp_path):
    files = {}
    for encoder in ("vision", "text"):
        files[encoder] = str(tmp_path / f"clip_{encoder}.engine")
        (tmp_path / f"clip_{encoder}.engine").write_bytes(b"serialized engine " + encoder.encode())
    written = write_triton_repository(
        DeployFiles(str(tmp_path / "clip"), ".engine", files),
        str(tmp_path / "repo"),
        Sizes(224, 768, 64),
        max_batch_size=8,
    )
    assert sorted(written) == ["clip_image", "clip_text"]
    for name, folder in written.items():
        config = _parse(tmp_path / "repo" / name / "config.pbtxt")
        assert folder == str(tmp_path / "repo" / name)
        assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        assert config.max_batch_size == 8 and (tmp_path / "repo" / name / "1" / "model.plan").is_file()
    assert list(_parse(tmp_path / "repo" / "clip_image" / "config.pbtxt").input[0].dims) == [3, 224, 224]


def test_naflex_models_are_refused_before_any_file_is_written(tiny_spec, tmp_path, capsys):
    spec = tiny_spec("tiny-siglip2-naflex")
    onnx_file, repo = tmp_path / "x" / "clip.onnx", tmp_path / "triton"
    args = [f"export.onnx_file={onnx_file}", f"export.triton_repository={repo}"]
    assert main(["export", "-e", str(spec), *args]) == 1
    assert "NaFlex models are not written as a Triton repository" in capsys.readouterr().err
    assert not onnx_file.exists() and not repo.exists()
    # serve refuses them the same way, before it listens
    assert main(["serve", "-e", str(spec), "serve.port=0"]) == 1
    assert "NaFlex models are not served yet" in capsys.readouterr().err


def test_fp16_export_keeps_fp32_io_and_gets_the_extended_graph_level(tiny_spec, tmp_path):
    spec = tiny_spec("tiny-clip")
    repo = tmp_path / "triton"
    args = [f"export.onnx_file={tmp_path / 'x' / 'clip.onnx'}", "export.encoder_type=separate"]
    assert main(["export", "-e", str(spec), *args, "export.data_type=fp16", f"export.triton_repository={repo}"]) == 0
    for name in ("clip_image", "clip_text"):
        config = _parse(repo / name / "config.pbtxt")
        model_file = repo / name / "1" / "model.onnx"
        _check_against_graph(config, model_file, batched=True)
        assert {model_config_pb2.DataType.Name(t.data_type) for t in config.output} == {"TYPE_FP32"}
        # Triton's ONNX Runtime without its CPU layout optimiser, which crashes on this graph.
        assert config.optimization.graph.level == 1
        for output, array in _run(config, model_file, batch=3).items():
            assert array.shape == (3, *config.output[0].dims) and np.isfinite(array).all(), output
    assert (
        model_config_pb2.DataType.Name(_parse(repo / "clip_image" / "config.pbtxt").input[0].data_type) == "TYPE_FP32"
    )


def test_fp16_inputs_and_outputs_are_configured_as_fp16(tmp_path):
    """A graph whose I/O is fp16, as ONNX Runtime's own float16 converter writes it without keep_io_types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from clip_tao.deploy.onnx_export import export_onnx
    from clip_tao.models import create_model

    export_onnx(create_model("tiny-siglip2", pretrained=False), str(tmp_path / "m.onnx"), encoder_type="separate")
    for encoder in ("vision", "text"):
        converted = convert_float_to_float16(str(tmp_path / f"m_{encoder}.onnx"), keep_io_types=False)
        OnnxModel(converted).topological_sort()
        onnx.save(converted, tmp_path / f"h_{encoder}.onnx")
    files = DeployFiles(str(tmp_path / "h"), ".onnx", {e: str(tmp_path / f"h_{e}.onnx") for e in ("vision", "text")})
    written = write_triton_repository(files, str(tmp_path / "repo"), Sizes(64, 32, 64))
    image = _parse(tmp_path / "repo" / "clip_image" / "config.pbtxt")
    assert [model_config_pb2.DataType.Name(t.data_type) for t in [*image.input, *image.output]] == ["TYPE_FP16"] * 2
    for name in written:
        config = _parse(tmp_path / "repo" / name / "config.pbtxt")
        model_file = tmp_path / "repo" / name / "1" / "model.onnx"
        _check_against_graph(config, model_file, batched=True)
        outputs = _run(config, model_file, batch=2)
        assert all(array.dtype == np.float16 and array.shape[0] == 2 for array in outputs.values())

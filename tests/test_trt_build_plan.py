"""Which TensorRT build each (TensorRT version, tensorrt.data_type, ONNX precision) gets, without a GPU.

The expectations follow NVIDIA's TensorRT 10 -> 11 migration guide: TensorRT 11 removed BuilderFlag.FP16 and
OBEY_PRECISION_CONSTRAINTS (fp16 comes from the graph, as ModelOpt AutoCast or a float16 converter writes it),
its networks are always strongly typed and its STRONGLY_TYPED creation flag is deprecated and ignored; on
TensorRT 10 strong typing is opted into with that flag. The graph precision is read from real exported files.
"""

import pytest

from clip_tao.deploy.mixed_precision import file_data_type
from clip_tao.deploy.onnx_export import export_onnx
from clip_tao.deploy.trt_builder import BuildPlan, build_plan
from clip_tao.errors import ConfigError
from clip_tao.models import create_model

WEAK_FP16 = BuildPlan(False, (), ("FP16", "OBEY_PRECISION_CONSTRAINTS"), True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Real exports of one tiny model: an fp32 and a mixed-precision fp16 file."""
    folder = tmp_path_factory.mktemp("plans")
    model = create_model("tiny-clip", pretrained=False)
    files = {}
    for data_type in ("fp32", "fp16"):
        files[data_type] = str(folder / data_type / "m.onnx")
        export_onnx(model, files[data_type], data_type=data_type)
    return files


def test_exported_files_declare_their_precision(exported):
    assert file_data_type(exported["fp32"]) == "fp32"
    assert file_data_type(exported["fp16"]) == "fp16"


@pytest.mark.parametrize(
    ("version", "data_type", "graph", "plan"),
    [
        # TensorRT 10 from an fp32 file: today's weakly typed builds.
        ("10.13.0.35", "fp32", "fp32", BuildPlan(False, (), (), False)),
        ("10.13.0.35", "fp16", "fp32", WEAK_FP16),
        # A mixed-precision file is built as written, strongly typed, on 10 (with the flag) and on 11 (always).
        ("10.13.0.35", "fp16", "fp16", BuildPlan(True, ("STRONGLY_TYPED",), (), False)),
        ("11.4.0.106", "fp16", "fp16", BuildPlan(True, (), (), False)),
        # TensorRT 11, fp32: strongly typed too, with no precision flags at all.
        ("11.4.0.106", "fp32", "fp32", BuildPlan(True, (), (), False)),
    ],
)
def test_build_plan(exported, version, data_type, graph, plan):
    assert build_plan(version, data_type, file_data_type(exported[graph]), exported[graph]) == plan


def test_tensorrt_11_fp16_needs_the_fp16_export(exported):
    with pytest.raises(ConfigError, match=r"TensorRT 11.4.0.106 builds the precision written in the ONNX graph.*"
                       r"m.onnx is fp32: export with export.data_type=fp16"):  # fmt: skip
        build_plan("11.4.0.106", "fp16", file_data_type(exported["fp32"]), exported["fp32"])


@pytest.mark.parametrize("version", ["10.0.1", "11.4.0.106"])
def test_an_fp16_file_is_not_built_as_fp32(exported, version):
    with pytest.raises(ConfigError, match="mixed-precision fp16 export.*tensorrt.data_type=fp16"):
        build_plan(version, "fp32", file_data_type(exported["fp16"]), exported["fp16"])


@pytest.mark.parametrize(("version", "graph"), [("10.13.0.35", "fp16"), ("11.4.0.106", "fp32")])
def test_layer_precisions_only_on_weakly_typed_builds(exported, version, graph):
    with pytest.raises(ConfigError, match="layers_precision needs a weakly typed build"):
        build_plan(version, graph, file_data_type(exported[graph]), exported[graph], ["*Softmax*:fp32"])
    # TensorRT 10 from the fp32 file still honours them.
    assert build_plan("10.13.0.35", "fp16", "fp32", exported["fp32"], ["*Softmax*:fp32"]) == WEAK_FP16


def test_tensorrt_before_10_is_refused():
    with pytest.raises(ConfigError, match=r"needs TensorRT 10 or newer \(found 8.6.1\)"):
        build_plan("8.6.1", "fp32", "fp32", "m.onnx")

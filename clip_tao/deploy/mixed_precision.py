"""``export.data_type: fp16``: a mixed-precision ONNX graph, with the precision written into the graph.

Weights and activations become fp16; LayerNorm, Softmax, reductions and the final L2 normalisation stay fp32
(the numerically sensitive parts: SigLIP2 loses accuracy otherwise). The final normalisation is every node
between an output and the last matrix product, which also keeps the logit scale/bias outputs in fp32. Inputs
and outputs keep their fp32 types, so clients feed and read a mixed-precision file as an fp32 one.

The conversion is ONNX Runtime's own float16 converter (``onnxruntime.transformers.float16``, shipped with
onnxruntime) with these block lists. TensorRT 11 builds such a file as it is: its networks are strongly typed.
"""

from __future__ import annotations

import onnx

from clip_tao.errors import ModelError

DATA_TYPES = ("fp32", "fp16")
# Kept in fp32 wherever they appear. LayerNormalization is one op from opset 17 on (earlier opsets spell it
# out as reductions and a Pow, whose square overflows fp16), hence FP16_MIN_OPSET. Resize: NaFlex's
# position-table resize, small and exact in fp32.
FP32_OPS = frozenset(
    {
        "LayerNormalization",
        "Softmax",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "Resize",
    }
)
FP16_MIN_OPSET = 17
_PROJECTIONS = frozenset({"MatMul", "Gemm", "Conv"})
# ONNX Runtime 1.32's CPU layout optimiser (NCHWc) crashes the process on some mixed-precision graphs
# (open_clip's ViT); its sessions of fp16 files run without it (it only reorders the patch convolution).
ORT_FP16_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def final_normalisation_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes between each graph output and the nearest matrix product / convolution above it."""
    producers = {output: node for node in graph.node for output in node.output}
    marked: set[str] = set()
    stack = [producers.get(output.name) for output in graph.output]
    while stack:
        node = stack.pop()
        if node is None or node.op_type in _PROJECTIONS or node.name in marked:
            continue
        marked.add(node.name)
        stack.extend(producers.get(name) for name in node.input if name)
    return marked


def convert_to_mixed_fp16(path: str) -> onnx.ModelProto:
    """The fp32 ONNX file at ``path`` (external data beside it is read too) as a mixed-precision model."""
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    graph = onnx.load(path, load_external_data=False).graph
    unnamed = [node.op_type for node in graph.node if not node.name]
    if unnamed:  # the block list is by node name; the exporter names every node
        raise ModelError(f"{path}: {len(unnamed)} unnamed nodes ({unnamed[0]} ...); cannot keep them in fp32")
    model = float16.convert_float_to_float16(
        path,  # a path, not a ModelProto: shape inference then works past protobuf's 2 GB limit
        keep_io_types=True,
        op_block_list=sorted(FP32_OPS | set(float16.DEFAULT_OP_BLOCK_LIST)),
        node_block_list=sorted(final_normalisation_nodes(graph)),
    )
    _skip_fp16_round_trips(model.graph)
    OnnxModel(model).topological_sort()  # the converter appends its Cast nodes at the end of the graph
    return model


def _skip_fp16_round_trips(graph: onnx.GraphProto) -> None:
    """The converter casts every fp32 node's output to fp16 and back when the next node is fp32 too: read
    the fp32 value directly instead, so that a block of fp32 nodes (the final normalisation) stays fp32."""
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        first = producers.get(node.input[0]) if _is_cast(node, fp32) else None
        if first is not None and _is_cast(first, fp16):
            node.input[0] = first.input[0]  # Cast(to=fp32) of the fp32 (or integer) value itself
    # Drop the fp16 casts nobody reads any more.
    while True:
        used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        dead = [node for node in graph.node if _is_cast(node, fp16) and node.output[0] not in used]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _is_cast(node: onnx.NodeProto, to: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)


def graph_data_type(model: onnx.ModelProto) -> str:
    """``"fp16"`` when the graph computes in fp16 anywhere (fp16 weights, casts or I/O), else ``"fp32"``."""
    fp16 = onnx.TensorProto.FLOAT16
    graph = model.graph
    if any(t.data_type == fp16 for t in graph.initializer):
        return "fp16"
    if any(v.type.tensor_type.elem_type == fp16 for v in [*graph.input, *graph.output]):
        return "fp16"
    for node in graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute):
            return "fp16"
        if node.op_type == "Constant" and any(a.t.data_type == fp16 for a in node.attribute):
            return "fp16"
    return "fp32"


def file_data_type(path: str) -> str:
    """:func:`graph_data_type` of an ONNX file, without reading its external weights."""
    return graph_data_type(onnx.load(path, load_external_data=False))


def ort_session_options(path: str) -> dict:
    """Extra ``onnxruntime.InferenceSession`` keyword arguments for the file at ``path``."""
    if file_data_type(path) == "fp16":
        return {"disabled_optimizers": list(ORT_FP16_DISABLED_OPTIMIZERS)}
    return {}

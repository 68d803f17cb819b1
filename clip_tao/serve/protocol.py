"""The KServe v2 / Triton HTTP inference protocol: request bodies to numpy tensors, and back.

A request body is a JSON header, optionally followed by the raw bytes of the inputs that say
``parameters.binary_data_size`` (Triton's binary tensor extension; the JSON length is then given by the
``Inference-Header-Content-Length`` header). BYTES tensors in binary form are elements each prefixed
by its length as a 4-byte little-endian integer. Responses use the same layout for outputs requested
in binary (``parameters.binary_data`` on an output, or ``parameters.binary_data_output`` on the request).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

# KServe v2 datatypes this server accepts or returns.
NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class ProtocolError(ValueError):
    """A request the client must fix; the message goes back to it as ``{"error": ...}`` with 400."""


@dataclass
class InferRequest:
    """A parsed request: its inputs by name, and how each requested output is to be sent."""

    id: str | None
    inputs: dict[str, np.ndarray]  # FP32 etc. as numpy arrays, BYTES as object arrays of ``bytes``
    datatypes: dict[str, str]
    outputs: dict[str, bool] = field(default_factory=dict)  # name -> binary; empty: all outputs
    binary_default: bool = False


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Split ``body`` into the JSON header and the binary section, and decode every input tensor."""
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < json_size <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {json_size} does not fit a body of {len(body)} bytes")
    else:
        json_size = len(body)
    try:
        header = json.loads(body[:json_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request's JSON header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise ProtocolError('the request needs a non-empty "inputs" list')
    binary = memoryview(body)[json_size:]
    offset = 0
    inputs, datatypes = {}, {}
    for tensor in header["inputs"]:
        name, shape, datatype = _tensor_fields(tensor)
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the end of the request body")
            inputs[name] = _from_binary(name, bytes(binary[offset : offset + size]), shape, datatype)
            offset += size
        elif "data" in tensor:
            inputs[name] = _from_json(name, tensor["data"], shape, datatype)
        else:
            raise ProtocolError(f'input {name!r} has neither "data" nor parameters.binary_data_size')
        datatypes[name] = datatype
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data follow the inputs that no input claims")
    outputs = {}
    for output in header.get("outputs") or []:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise ProtocolError('every entry of "outputs" needs a "name"')
        outputs[output["name"]] = bool((output.get("parameters") or {}).get("binary_data", False))
    parameters = header.get("parameters") or {}
    request_id = header.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs,
        datatypes=datatypes,
        outputs=outputs,
        binary_default=bool(parameters.get("binary_data_output", False)),
    )


def _tensor_fields(tensor) -> tuple[str, list[int], str]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise ProtocolError('every input needs a "name"')
    name = tensor["name"]
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f'input {name!r}: "shape" must be a list of non-negative integers, got {shape!r}')
    if datatype != "BYTES" and datatype not in NUMPY_DTYPES:
        raise ProtocolError(f"input {name!r}: datatype {datatype!r} is not supported")
    return name, shape, datatype


def _from_binary(name: str, raw: bytes, shape: list[int], datatype: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise ProtocolError(f"input {name!r}: BYTES data is cut off inside a length prefix")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise ProtocolError(f"input {name!r}: a BYTES element of {length} bytes runs past its data")
            elements.append(raw[offset : offset + length])
            offset += length
        if len(elements) != count:
            raise ProtocolError(f"input {name!r}: shape {shape} needs {count} elements, the data holds {len(elements)}")
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array.reshape(shape)
    dtype = np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _from_json(name: str, data, shape: list[int], datatype: str) -> np.ndarray:
    count = math.prod(shape)
    flat = _flatten(data)
    if len(flat) != count:
        raise ProtocolError(f"input {name!r}: shape {shape} needs {count} elements, the data holds {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input {name!r}: BYTES data in JSON must be strings")
        array = np.empty(count, dtype=object)
        array[:] = [x.encode("utf-8") for x in flat]
        return array.reshape(shape)
    if not all(isinstance(x, (int, float, bool)) for x in flat):
        raise ProtocolError(f"input {name!r}: {datatype} data must be numbers")
    return np.asarray(flat, dtype=NUMPY_DTYPES[datatype]).reshape(shape)


def _flatten(data) -> list:
    if not isinstance(data, list):
        return [data]
    flat = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def encode_infer_response(
    model_name: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else ``None``)."""
    tensors, chunks = [], []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        tensor = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if request.outputs.get(name, request.binary_default):
            raw = array.astype("<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    response = {"model_name": model_name, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)

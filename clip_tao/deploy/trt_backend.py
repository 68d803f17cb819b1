"""TensorRT backend: engines run with their input/output buffers as PyTorch CUDA tensors."""

from __future__ import annotations

import logging
import os

import torch

from clip_tao.deploy.files import find_files
from clip_tao.deploy.runtime import DeployedEncoder
from clip_tao.deploy.tensorrt_support import import_tensorrt

log = logging.getLogger(__name__)


class TensorRTEncoder(DeployedEncoder):
    """``encode_image`` / ``encode_text`` through TensorRT engines, batched to each engine's profile."""

    def __init__(self, engine_file: str, key: str = "trt_engine", device_index: int = 0):
        trt = import_tensorrt()
        ext = os.path.splitext(engine_file)[1] or ".engine"
        super().__init__(find_files(engine_file, ext, key), key)
        self.trt = trt
        self.device = torch.device("cuda", device_index)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name, path in self.files.encoders.items():
            with open(path, "rb") as f:
                engine = runtime.deserialize_cuda_engine(f.read())
            if engine is None:
                from clip_tao.errors import ModelError

                raise ModelError(
                    f"{key}: {path} is not a TensorRT engine for this TensorRT version and GPU; rebuild it"
                )
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        log.info("TensorRT: %s", ", ".join(self.files.encoders.values()))

    def _io_names(self, engine, mode) -> list[str]:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [n for n in names if engine.get_tensor_mode(n) == mode]

    def _max_batch(self, engine, name: str) -> int:
        return engine.get_tensor_profile_shape(name, 0)[2][0]

    def _run(self, encoder: str, output: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.require(encoder)
        key = encoder if encoder in self.engines else "combined"
        engine, context = self.engines[key], self.contexts[key]
        first = next(iter(inputs))
        total, step = inputs[first].shape[0], self._max_batch(engine, first)
        pieces = [
            self._run_chunk(engine, context, output, {k: v[s : s + step] for k, v in inputs.items()})
            for s in range(0, total, step)
        ]
        return torch.cat(pieces).float().cpu()

    def _run_chunk(self, engine, context, output: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        trt = self.trt
        feed = {**self._dummy_inputs(engine, inputs), **inputs}
        keep = []  # buffers must outlive the asynchronous execution
        for name in self._io_names(engine, trt.TensorIOMode.INPUT):
            tensor = feed[name].to(self.device, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = {}
        for name in self._io_names(engine, trt.TensorIOMode.OUTPUT):
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(
                shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device=self.device
            )
            context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            from clip_tao.errors import ModelError

            raise ModelError(f"{self.key}: TensorRT execution failed")
        stream.synchronize()
        return outputs[output]

    def _dummy_inputs(self, engine, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A combined engine needs every input: give the other modality the smallest batch its profile allows."""
        dummies = {}
        for name in self._io_names(engine, self.trt.TensorIOMode.INPUT):
            if name not in given:
                smallest = tuple(engine.get_tensor_profile_shape(name, 0)[0])
                dummies[name] = torch.ones(smallest, dtype=torch.int64) if name != "image" else torch.zeros(smallest)
        return dummies

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("vision", "image_embedding", {"image": pixels.float()})

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.long()
        return self._run("text", "text_embedding", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64}
    bf16 = getattr(trt, "bfloat16", None)
    if bf16 is not None:
        table[bf16] = torch.bfloat16
    return table[dtype]

"""What the ONNX Runtime and TensorRT backends share: the ClipModel-like surface tasks use.

A backend has ``encode_image(pixels)`` / ``encode_text(input_ids)`` (torch tensors in and out,
L2-normalised ``[B, D]`` embeddings), ``tokenizer``, ``preprocess``, ``model_type``, ``embed_dim``, and
the no-op ``eval``/``train``/``to`` that the embedding loops call on PyTorch models.
"""

from __future__ import annotations

import os

import torch

from clip_tao.config.loader import read_spec_file
from clip_tao.config.schema import DeployInfo
from clip_tao.deploy.files import DeployFiles
from clip_tao.errors import ModelError
from clip_tao.models.base import Preprocess
from clip_tao.models.tokenizer import load_tokenizer


class DeployedEncoder:
    """Base of the runtime backends: reads ``X_config.yaml`` and ``X_tokenizer/`` beside the files."""

    training = False

    def __init__(self, files: DeployFiles, key: str):
        self.files = files
        self.key = key
        if not os.path.isfile(files.config):
            raise ModelError(
                f"{key}: {files.config} is missing; it is written by clip-tao export beside the model file"
            )
        info = read_spec_file(files.config).get("deploy") or {}
        self.info = DeployInfo(**info)
        if not self.info.image_size:
            raise ModelError(f"{files.config} has no deploy section: re-export the model with clip-tao export")
        self.tokenizer = load_tokenizer(files.tokenizer)
        self.preprocess = Preprocess(
            image_size=self.info.image_size,
            mean=tuple(self.info.mean),
            std=tuple(self.info.std),
            interpolation=self.info.interpolation,
            resize_mode=self.info.resize_mode,
            # NaFlex exports: the loaders cut images into patch sequences exactly as for the PyTorch model.
            patch_size=self.info.patch_size,
            max_num_patches=self.info.max_num_patches,
        )
        self.model_type = self.info.model_type
        self.embed_dim = self.info.embed_dim
        self.context_length = self.info.context_length

    def has(self, encoder: str) -> bool:
        return self.files.combined or encoder in self.files.encoders

    def require(self, encoder: str) -> None:
        """One clear line when a task needs an encoder whose file is not there."""
        if not self.has(encoder):
            present = ", ".join(os.path.basename(p) for p in self.files.encoders.values())
            missing = f"{os.path.basename(self.files.base)}_{encoder}{self.files.ext}"
            raise ModelError(
                f"{self.key}: this task needs the {encoder} encoder, but only {present} exists; add {missing}"
            )

    # The embedding loops treat backends like PyTorch models.
    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} does not implement encode_image")

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} does not implement encode_text")

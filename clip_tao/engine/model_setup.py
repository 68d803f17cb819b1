"""Build the model a task needs from the typed config (and a checkpoint when one is given)."""

from __future__ import annotations

import logging

import torch

from clip_tao.config.schema import ExperimentConfig
from clip_tao.engine.device import select_device
from clip_tao.engine.weights import load_weights
from clip_tao.models import ClipModel, create_model

log = logging.getLogger(__name__)


def build_model(cfg: ExperimentConfig, checkpoint: str | None = None) -> ClipModel:
    """``model.type`` with its published weights (or ``model.pretrained_path``), then ``checkpoint`` on top.

    With a checkpoint the published weights are not fetched from the hub: the checkpoint replaces all of
    them. A local ``model.pretrained_path`` is still read, because for some families (Radio-CLIP, SigLIP2)
    the architecture and the tokenizer come from those files.
    """
    m = cfg.model
    model = create_model(
        m.type,
        pretrained=checkpoint is None,
        pretrained_path=m.pretrained_path,
        image_size=m.image_size,
        canonicalize_text=m.canonicalize_text,
        loss_type=cfg.train.loss_type,
        init_logit_scale=m.init_logit_scale,
        init_logit_bias=m.init_logit_bias,
        adaptor_name=m.adaptor_name,
        radio_repo_dir=m.radio_repo_dir,
        text_pretrained_path=m.text_pretrained_path,
        tokenizer_path=m.tokenizer_path,
        max_num_patches=m.max_num_patches,
    )
    if checkpoint:
        load_weights(model, checkpoint, cfg.peft)
        log.info("loaded weights from %s", checkpoint)
    return model


def build_encoder(cfg: ExperimentConfig, section: str, device: torch.device | None = None):
    """What ``evaluate``/``inference`` embed with, and its device.

    ``<section>.trt_engine`` -> TensorRT, ``<section>.onnx_file`` -> ONNX Runtime, else the PyTorch model
    from ``<section>.checkpoint`` (or the type's own weights when it is null) on ``device`` (default: the
    one ``<section>.num_gpus``/``gpu_ids`` choose; one process of a torchrun job passes its own).
    """
    from clip_tao.deploy.backends import open_deployed

    s = getattr(cfg, section)
    deployed = open_deployed(s.onnx_file, s.trt_engine, section)
    if deployed is not None:
        return deployed, getattr(deployed, "device", torch.device("cpu"))
    model = build_model(cfg, s.checkpoint)
    device = device or select_device(s.num_gpus, s.gpu_ids)
    return model.to(device), device


def backend_name(section) -> str:
    """``tensorrt``, ``onnxruntime`` or ``pytorch``: what a task section runs on."""
    return "tensorrt" if section.trt_engine else "onnxruntime" if section.onnx_file else "pytorch"

"""Build the model a task needs from the typed config (and a checkpoint when one is given)."""

from __future__ import annotations

import logging

from clip_tao.config.schema import ExperimentConfig
from clip_tao.engine.checkpoint import load_model_weights
from clip_tao.models import ClipModel, create_model

log = logging.getLogger(__name__)


def build_model(cfg: ExperimentConfig, checkpoint: str | None = None) -> ClipModel:
    """``model.type`` with its published weights (or ``model.pretrained_path``), then ``checkpoint`` on top.

    With a checkpoint the published weights are not fetched: the checkpoint replaces all of them.
    """
    m = cfg.model
    model = create_model(
        m.type,
        pretrained=checkpoint is None,
        pretrained_path=None if checkpoint else m.pretrained_path,
        image_size=m.image_size,
        canonicalize_text=m.canonicalize_text,
        loss_type=cfg.train.loss_type,
        init_logit_scale=m.init_logit_scale,
        init_logit_bias=m.init_logit_bias,
    )
    if checkpoint:
        load_model_weights(model, checkpoint)
        log.info("loaded weights from %s", checkpoint)
    return model

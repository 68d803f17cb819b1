"""Model families behind one interface (:class:`ClipModel`) and one entry point (:func:`create_model`)."""

from clip_tao.models.base import ClipModel, Preprocess
from clip_tao.models.registry import ModelInfo, add_model_config, create_model, get_model_info, list_models

__all__ = ["ClipModel", "ModelInfo", "Preprocess", "add_model_config", "create_model", "get_model_info", "list_models"]

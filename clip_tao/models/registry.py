"""``model.type`` -> model: a registry whose entries are data.

Every model type is one JSON file in ``clip_tao/models/configs/`` (scanned at import, like open_clip's
``model_configs/``): its family, sizes, weights source and the family-specific architecture config.
A family module registers one builder with :func:`clip_tao.models.family.register_family`; adding a size
is a new JSON file, not a new code path. Users can add their own with :func:`add_model_config`.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from pathlib import Path
from typing import Any

from clip_tao.errors import ConfigError, ModelError
from clip_tao.models.base import DEFAULT_LOGIT_INIT, ClipModel
from clip_tao.models.family import BuildOptions, ModelInfo, family_builder

CONFIG_DIR = Path(__file__).parent / "configs"

_MODEL_INFOS: dict[str, ModelInfo] = {}


def add_model_config(source: str | Path | dict[str, Any], name: str | None = None) -> ModelInfo:
    """Register a model type from a JSON file (name = file stem) or a dict (``name`` required)."""
    if isinstance(source, dict):
        data = dict(source)
        if name is None:
            raise ValueError("add_model_config(dict) needs a name")
    else:
        path = Path(source)
        data = json.loads(path.read_text(encoding="utf-8"))
        name = name or path.stem
    info = ModelInfo(
        name=name,
        family=data["family"],
        image_size=int(data["image_size"]),
        embed_dim=int(data["embed_dim"]),
        context_length=int(data["context_length"]),
        weights=data.get("weights", ""),
        description=data.get("description", ""),
        config=data.get("config", {}),
    )
    _MODEL_INFOS[name] = info
    return info


def list_models(pattern: str = "*") -> list[ModelInfo]:
    """Registered model types whose name matches the shell-style ``pattern``, sorted by name."""
    return [_MODEL_INFOS[n] for n in sorted(_MODEL_INFOS) if fnmatch.fnmatch(n, pattern)]


def get_model_info(model_type: str) -> ModelInfo:
    if model_type not in _MODEL_INFOS:
        # TAO's fallback: any other open_clip architecture name is a type too.
        from clip_tao.models.openclip_any import openclip_model_info

        info = openclip_model_info(model_type)
        if info is not None:
            return info
        close = difflib.get_close_matches(model_type, list(_MODEL_INFOS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else "run `clip-tao list-models` for the list"
        raise ModelError(f"model.type={model_type!r} is not a known model type; {hint}")
    return _MODEL_INFOS[model_type]


def create_model(
    model_type: str,
    *,
    pretrained: bool = True,
    pretrained_path: str | None = None,
    image_size: int | None = None,
    canonicalize_text: bool = False,
    loss_type: str = "siglip",
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    adaptor_name: str | None = None,
    radio_repo_dir: str | None = None,
    text_pretrained_path: str | None = None,
    tokenizer_path: str | None = None,
    max_num_patches: int | None = None,
) -> ClipModel:
    """Build ``model_type``: the one public entry point to every family.

    Weights: the type's published weights when ``pretrained`` (or the file/folder ``pretrained_path``),
    else random initialisation. The logit scale/bias start at TAO's defaults for ``loss_type`` when the
    model is randomly initialised; an explicit ``init_logit_scale``/``init_logit_bias`` always wins.
    ``adaptor_name``, ``radio_repo_dir`` and ``text_pretrained_path`` are Radio-CLIP's;
    ``tokenizer_path`` is a local tokenizer folder for families whose tokenizer lives on the hub;
    ``max_num_patches`` is the patch budget of NaFlex types (refused by the others).
    """
    if init_logit_scale is not None and init_logit_scale < 0.0:
        # exp(raw) < 1 would divide the similarities; above ln 100 is allowed (TAO 7.3 raises its clamp to it).
        raise ModelError(f"model.init_logit_scale={init_logit_scale} must be >= 0 (the scale is exp of it)")
    info = get_model_info(model_type)
    builder = family_builder(info.family)
    options = BuildOptions(
        pretrained=pretrained,
        pretrained_path=pretrained_path,
        image_size=image_size,
        canonicalize_text=canonicalize_text,
        adaptor_name=adaptor_name,
        radio_repo_dir=radio_repo_dir,
        text_pretrained_path=text_pretrained_path,
        tokenizer_path=tokenizer_path,
        max_num_patches=max_num_patches,
    )
    model, loaded_weights = builder(info, options)
    if max_num_patches is not None and not model.preprocess.naflex:
        raise ConfigError(
            f"model.max_num_patches is for NaFlex types (siglip2-so400m-patch16-naflex); {model_type} takes "
            "fixed-size images: remove the key or set model.image_size"
        )
    default_scale, default_bias = DEFAULT_LOGIT_INIT[loss_type]
    if not loaded_weights:
        model.init_logits(default_scale, default_bias)
    if init_logit_scale is not None:
        model.logit_scale.data.fill_(init_logit_scale)
    if init_logit_bias is not None:
        model.logit_bias.data.fill_(init_logit_bias)
    return model


def _scan_configs() -> None:
    for path in sorted(CONFIG_DIR.glob("*.json")):
        add_model_config(path)


_scan_configs()

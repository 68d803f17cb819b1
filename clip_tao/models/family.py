"""What a model family module and the registry share: the records a builder receives and the builder table.

A family module (``openclip_family``, ``siglip_family`` ...) registers one builder with
:func:`register_family`; :func:`family_builder` finds it, importing the family's module on first use.
Family modules import this module, never :mod:`clip_tao.models.registry`, so the registry may import them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clip_tao.errors import ModelError
from clip_tao.models.base import ClipModel

# family name -> module that registers its builder (imported on first use).
FAMILY_MODULES = {
    "openclip": "clip_tao.models.openclip_family",
    "siglip": "clip_tao.models.siglip_family",
    "radio": "clip_tao.models.radio_family",
    "siglip2-naflex": "clip_tao.models.naflex_family",
    "openclip-any": "clip_tao.models.openclip_any",
}


@dataclass(frozen=True)
class ModelInfo:
    """What ``clip-tao list-models`` shows, plus the architecture config the family builder reads."""

    name: str
    family: str
    image_size: int
    embed_dim: int
    context_length: int
    weights: str
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class BuildOptions:
    """How to build a model: which weights, and the user's pre-processing choices."""

    pretrained: bool = True  # load the type's published weights (False: random init for training)
    pretrained_path: str | None = None  # a local file or folder instead of the hub
    image_size: int | None = None  # None: the type's own size
    canonicalize_text: bool = False
    adaptor_name: str | None = None  # Radio-CLIP: which teacher's head and text tower
    radio_repo_dir: str | None = None  # Radio-CLIP: a local clone of NVlabs/RADIO for torch.hub (source='local')
    text_pretrained_path: str | None = None  # Radio-CLIP: the teacher text tower, local folder/file
    tokenizer_path: str | None = None  # a local tokenizer folder instead of the hub (Gemma, BERT)
    max_num_patches: int | None = None  # NaFlex: the patch budget of an image (None: the model's default)


Builder = Callable[[ModelInfo, BuildOptions], tuple[ClipModel, bool]]
_BUILDERS: dict[str, Builder] = {}


def register_family(family: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(info, options) -> (model, loaded_weights)`` for every type of ``family``.

    ``loaded_weights`` says that the logit scale/bias came with the weights; when False they start at
    TAO's defaults for the loss (Radio-CLIP's checkpoints, for one, carry none).
    """

    def decorate(builder: Builder) -> Builder:
        _BUILDERS[family] = builder
        return builder

    return decorate


def family_builder(family: str) -> Builder:
    """The builder registered for ``family``, importing its module first when needed."""
    if family not in _BUILDERS and family in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[family])
    if family not in _BUILDERS:
        raise ModelError(f"model family {family!r} has no builder; known: {', '.join(sorted(FAMILY_MODULES))}")
    return _BUILDERS[family]

"""Radio-CLIP: a C-RADIO image backbone + one adaptor head, paired with that adaptor teacher's text tower.

``model.adaptor_name`` picks the teacher: ``siglip`` (the SigLIP2 teacher; Gemma tokenizer, length 64) or
``clip`` (aliases ``dfn``, ``dfn_clip``: the DFN CLIP ViT-H-14-378 teacher; BPE tokenizer, length 77). The
image embedding is the adaptor head applied to that teacher's class token; the teachers' own logit
scale and bias are not part of RADIO's checkpoints, so the model has its own (TAO's defaults per loss).

Weights: ``model.pretrained_path`` (a RADIO ``.pth.tar``), else the published file from the HF hub
(``nvidia/C-RADIOv3-*``, served by the HF cache offline). With ``model.radio_repo_dir`` the image tower is
built by RADIO's own code through ``torch.hub.load(dir, source='local')``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import OPENAI_MEAN, OPENAI_STD, ClipModel, Preprocess, checked_image_size, seeded_init
from clip_tao.models.hub_cli import download_command, prepare_hub
from clip_tao.models.radio_backbone import (
    MlpHeadV2,
    RadioBackbone,
    head_state,
    load_backbone_weights,
    read_radio_checkpoint,
)
from clip_tao.models.registry import BuildOptions, ModelInfo, register_family
from clip_tao.models.text_towers import openclip_text_tower, siglip_text_tower
from clip_tao.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# model.adaptor_name -> the teacher type it selects in the checkpoint's args.teachers.
ADAPTOR_TYPES = {"siglip": "siglip2", "clip": "open_clip", "dfn": "open_clip", "dfn_clip": "open_clip"}


class RadioImageTower(nn.Module):
    """Backbone tokens -> the adaptor teacher's class token -> its MLP head: ``[B,3,H,W]`` -> ``[B, D]``."""

    def __init__(self, backbone: RadioBackbone, head: nn.Module, token_index: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.token_index = token_index

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(images)
        return self.head(tokens[:, self.token_index])


class HubRadioImageTower(nn.Module):
    """The image tower built by RADIO's own code (``torch.hub.load`` of a local clone).

    RADIO's model normalises internally (its input conditioner), so it takes ``[0, 1]`` pixels.
    """

    def __init__(self, radio: nn.Module, adaptor: str):
        super().__init__()
        self.radio = radio
        self.adaptor = adaptor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.radio(images)[self.adaptor].summary


class RadioClipModel(ClipModel):
    """Radio-CLIP behind the :class:`ClipModel` interface; towers under ``visual.`` and ``text.``."""

    def __init__(
        self,
        model_type: str,
        visual: nn.Module,
        text: nn.Module,
        tokenizer: Tokenizer,
        preprocess: Preprocess,
        embed_dim: int,
    ):
        super().__init__()
        self.model_type = model_type
        self.visual = visual
        self.text = text
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self._embed_dim = embed_dim
        self._logit_scale = nn.Parameter(torch.zeros(()))
        self._logit_bias = nn.Parameter(torch.zeros(()))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids)

    def vision_parameters(self) -> Iterator[nn.Parameter]:
        return self.visual.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return self.text.parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        backbone = getattr(self.visual, "backbone", None)
        if backbone is not None:
            backbone.grad_checkpointing = enable
        self.text.set_grad_checkpointing(enable)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self._logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:
        return self._logit_bias

    @property
    def embed_dim(self) -> int:
        return self._embed_dim


def resolve_adaptor(model_type: str, adaptor_name: str | None) -> str:
    """``model.adaptor_name`` -> the teacher type it selects; one clear error when missing or unknown."""
    if not adaptor_name:
        raise ModelError(
            f"model.adaptor_name is required for {model_type}: set it to siglip or clip (aliases: dfn, dfn_clip)"
        )
    if adaptor_name not in ADAPTOR_TYPES:
        raise ModelError(
            f"model.adaptor_name={adaptor_name!r} is not a Radio-CLIP adaptor: choose siglip or clip "
            "(aliases: dfn, dfn_clip)"
        )
    return ADAPTOR_TYPES[adaptor_name]


def find_teacher(teachers: list[dict], teacher_type: str, where: str) -> tuple[int, dict]:
    for index, teacher in enumerate(teachers):
        if teacher.get("type") == teacher_type:
            return index, teacher
    names = ", ".join(f"{t.get('name')} ({t.get('type')})" for t in teachers)
    raise ModelError(f"{where} has no {teacher_type} teacher to take an adaptor from; its teachers: {names}")


@register_family("radio")
def build_radio(info: ModelInfo, options: BuildOptions) -> tuple[RadioClipModel, bool]:
    cfg = info.config
    teacher_type = resolve_adaptor(info.name, options.adaptor_name)
    if options.radio_repo_dir:
        return _build_from_hub_repo(info, options, teacher_type)

    checkpoint = options.pretrained_path or (_published_checkpoint(cfg) if options.pretrained else None)
    if checkpoint:
        args, state = read_radio_checkpoint(checkpoint)
        where = f"RADIO checkpoint {checkpoint!r}"
    else:
        args, state, where = cfg["args"], None, f"{info.name}'s architecture"
    teachers = list(_get(args, "teachers") or [])
    index, teacher = find_teacher(teachers, teacher_type, where)

    with seeded_init():
        backbone = RadioBackbone(args, init_weights=state is None)
        if state is not None:
            head_weights = head_state(state, index, teacher.get("name", ""))
            if not head_weights:
                raise ModelError(
                    f"{where} has no adaptor head for its {teacher.get('name')} teacher (_heads.{index}.*)"
                )
            head = MlpHeadV2(**MlpHeadV2.shape_from_state(head_weights))
        else:
            head_weights = None
            head = MlpHeadV2(**cfg["heads"][teacher_type])
    if state is not None:
        load_backbone_weights(backbone, state, checkpoint)
        head.load_state_dict(head_weights)
        mean, std = _conditioner(state)
    else:
        mean, std = OPENAI_MEAN, OPENAI_STD
    token_index = index if bool(_get(args, "cls_token_per_teacher", False)) else 0
    visual = RadioImageTower(backbone, head, token_index)

    text, tokenizer, text_loaded = _text_tower(info, options, teacher, teacher_type)
    image_size = checked_image_size(info.name, options.image_size, info.image_size, backbone.patch_size)
    preprocess = Preprocess(
        image_size=image_size, mean=mean, std=std, interpolation=cfg.get("interpolation", "bicubic")
    )
    embed_dim = head.final[2].out_features
    model = RadioClipModel(info.name, visual, text, tokenizer, preprocess, embed_dim)
    if state is None and options.pretrained:
        log.warning("%s: no RADIO checkpoint given: using a fixed random initialisation", info.name)
    elif not text_loaded:
        log.warning("%s: the %s text tower is randomly initialised", info.name, teacher_type)
    # RADIO's checkpoints carry no logit scale/bias (the teachers' are dropped): they start at TAO's defaults.
    return model, False


def _text_tower(info: ModelInfo, options: BuildOptions, teacher: dict, teacher_type: str):
    cfg = info.config
    source = options.text_pretrained_path
    if source and not os.path.exists(source):
        raise ModelError(f"model.text_pretrained_path {source!r} does not exist")
    fetch = options.pretrained or bool(options.pretrained_path)
    with seeded_init():
        if teacher_type == "siglip2":
            text_config = None if (source or fetch) else cfg["text_configs"]["siglip2"]
            return siglip_text_tower(teacher, text_config, source, options.tokenizer_path)
        if not (source or fetch):
            teacher = {**teacher, "pretrained": ""}  # architecture only, no download
        return openclip_text_tower(teacher, source, options.canonicalize_text)


def _conditioner(state: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = state.get("input_conditioner.norm_mean")
    std = state.get("input_conditioner.norm_std")
    if mean is None or std is None:
        return OPENAI_MEAN, OPENAI_STD
    return tuple(float(v) for v in mean.flatten()), tuple(float(v) for v in std.flatten())


def _published_checkpoint(cfg: dict) -> str:
    """The published ``.pth.tar`` from the HF hub (the HF cache serves it with ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import hf_hub_download

    repo, filename = cfg["hf_repo"], cfg["hf_filename"]
    prepare_hub()
    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # hub errors come in many types; all mean "not reachable"
        raise ModelError(
            f"RADIO weights {repo}/{filename} are not reachable ({type(exc).__name__}): pre-fetch them with "
            f"`{download_command(repo, filename)}` (then HF_HUB_OFFLINE=1 works) or set "
            "model.pretrained_path to the .pth.tar file"
        ) from exc


def _build_from_hub_repo(info: ModelInfo, options: BuildOptions, teacher_type: str) -> tuple[RadioClipModel, bool]:
    """RADIO's own ``radio_model`` from a local clone, with its adaptor head; the text tower is ours."""
    repo = options.radio_repo_dir
    if not os.path.isfile(os.path.join(repo, "hubconf.py")):
        raise ModelError(f"model.radio_repo_dir {repo!r} holds no hubconf.py: give a local clone of NVlabs/RADIO")
    version = options.pretrained_path or info.config["radio_version"]
    if options.pretrained_path:
        args, _ = read_radio_checkpoint(options.pretrained_path)
        teachers = list(_get(args, "teachers") or [])
    else:
        teachers = info.config["args"]["teachers"]
    _, teacher = find_teacher(teachers, teacher_type, f"{info.name}'s checkpoint")
    name = teacher.get("name", "")
    try:
        radio = torch.hub.load(repo, "radio_model", source="local", version=version, adaptor_names=[name])
    except Exception as exc:  # RADIO's loader raises whatever its dependencies raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch.hub.load({repo!r}, 'radio_model', version={version!r}) failed: {first}") from exc
    adaptor = radio.adaptors[name]
    for attribute in ("text_model", "oc_model"):  # our own text tower replaces the adaptor's
        if hasattr(adaptor, attribute):
            setattr(adaptor, attribute, None)
    visual = HubRadioImageTower(radio, name)
    text, tokenizer, text_loaded = _text_tower(info, options, teacher, teacher_type)
    patch = getattr(radio, "patch_size", 16) or 16
    image_size = checked_image_size(info.name, options.image_size, info.image_size, patch)
    # RADIO's model conditions its input itself: feed it [0, 1] pixels.
    preprocess = Preprocess(image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    embed_dim = adaptor.head_mlp.final[2].out_features
    if not text_loaded:
        log.warning("%s: the %s text tower is randomly initialised", info.name, teacher_type)
    return RadioClipModel(info.name, visual, text, tokenizer, preprocess, embed_dim), False


def _get(args, name: str, default=None):
    return args.get(name, default) if isinstance(args, dict) else getattr(args, name, default)

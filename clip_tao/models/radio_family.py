"""Radio-CLIP: a C-RADIO image backbone (timm) + one adaptor head, paired with that teacher's text tower.

``model.adaptor_name`` picks the teacher as TAO does (:mod:`clip_tao.models.radio_adaptors`): null or
``siglip`` (the SigLIP2 teacher; Gemma tokenizer, length 64), ``clip`` / ``dfn`` / ``dfn_clip`` (the DFN CLIP
teacher; BPE tokenizer, length 77), or a RADIO teacher name such as ``siglip2-g``. The image embedding is
the adaptor head applied to that teacher's summary token; the teachers' own logit scale and bias are not
part of RADIO's checkpoints, so the model has its own (TAO's defaults per loss).

Weights: ``model.pretrained_path`` (RADIO's torch.hub ``.pth.tar`` or a Hugging Face RADIO folder), else the
published ``.pth.tar`` from the HF hub (served by the HF cache offline). With ``model.radio_repo_dir`` the
image tower is RADIO's own code from a local clone (``torch.hub.load(dir, source='local')``), its adaptor
head built the way RADIO's ``GenericAdaptor`` builds it, so no teacher model is downloaded.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.base import OPENAI_MEAN, OPENAI_STD, ClipModel, Preprocess, checked_image_size, seeded_init
from clip_tao.models.family import BuildOptions, ModelInfo, register_family
from clip_tao.models.hub_cli import download_command, prepare_hub
from clip_tao.models.radio_adaptors import Adaptor, resolve_adaptor
from clip_tao.models.radio_backbone import create_backbone, load_backbone, timm_arguments
from clip_tao.models.radio_checkpoint import RadioCheckpoint, arg, checkpoint_from_hub_dict, read_radio_checkpoint
from clip_tao.models.radio_heads import head_from_config, head_from_state
from clip_tao.models.text_towers import openclip_text_tower, siglip_text_tower
from clip_tao.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RadioImageTower(nn.Module):
    """timm RADIO backbone -> the adaptor teacher's summary token -> its MLP head: ``[B,3,H,W]`` -> ``[B, D]``.

    Input: pixels normalised with the checkpoint's input-conditioner mean/std; H and W multiples of the patch.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, token_slot: int, patch_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.token_slot = token_slot
        self.patch_size = patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ModelError(
                f"Radio-CLIP takes images whose sides are multiples of {self.patch_size}; got {height}x{width}: "
                "set model.image_size (and the transforms) to such a size"
            )
        tokens = self.backbone.forward_features(images)
        # RADIO runs its adaptor heads in float32 on the summary token.
        return self.head(tokens[:, self.token_slot].float())


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
            backbone.set_grad_checkpointing(enable)
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


@register_family("radio")
def build_radio(info: ModelInfo, options: BuildOptions) -> tuple[RadioClipModel, bool]:
    cfg = info.config
    if options.radio_repo_dir:
        return _build_from_hub_repo(info, options)
    source = options.pretrained_path or (_published_checkpoint(cfg) if options.pretrained else None)
    ckpt = read_radio_checkpoint(source) if source else None
    args = ckpt.args if ckpt else cfg["args"]
    where = f"RADIO checkpoint {source!r}" if ckpt else f"{info.name}'s published architecture"
    adaptor = _resolve(info, options, args, where, ckpt)
    if ckpt is not None and ckpt.conditioner is None:
        # RADIO loads its input conditioner strictly: a file without one is incomplete.
        raise ModelError(f"{where} lacks input_conditioner.norm_mean / norm_std: the file is incomplete")

    with seeded_init():
        if ckpt is not None:
            backbone = create_backbone(cfg["timm_model"], timm_arguments(args, where))
            unused = load_backbone(backbone, ckpt.backbone, where)
            prefix = "base_model." if ckpt.layout == "torch.hub" else "radio_model.model."
            ckpt.mark_unused("parts of timm's ViT RADIO does not run", [prefix + k for k in unused])
            head = _stored_head(ckpt, adaptor, where)
        else:
            backbone = create_backbone(cfg["timm_model"])
            shape = dict(cfg["heads"][adaptor.type])
            head = head_from_config(shape.pop("version", arg(args, "mlp_version", "v2")), shape)
    mean, std = ckpt.conditioner if ckpt is not None else (OPENAI_MEAN, OPENAI_STD)
    if ckpt is not None:
        _report_unused(ckpt)
        dtype = arg(args, "dtype", "float32")
        if "float32" not in str(dtype):
            # RADIO casts its backbone to args.dtype; here the weights stay float32 and the run's
            # precision setting (autocast) decides the compute type, so training is not in bf16 weights.
            log.info("%s records dtype %s: weights are loaded as float32", where, dtype)
    patch = backbone.embeds.patch_size[0] if hasattr(backbone.embeds, "patch_size") else 16
    visual = RadioImageTower(backbone, head, adaptor.token_slot, patch)

    text, tokenizer, text_loaded = _text_tower(info, options, adaptor)
    image_size = checked_image_size(info.name, options.image_size, info.image_size, patch)
    preprocess = Preprocess(
        image_size=image_size, mean=mean, std=std, interpolation=cfg.get("interpolation", "bicubic")
    )
    model = RadioClipModel(info.name, visual, text, tokenizer, preprocess, head.output_dim)
    if ckpt is None and options.pretrained:
        log.warning("%s: no RADIO checkpoint given: using a fixed random initialisation", info.name)
    elif not text_loaded:
        log.warning("%s: the %s text tower is randomly initialised", info.name, adaptor.name)
    # RADIO's checkpoints carry no logit scale/bias (the teachers' are dropped): they start at TAO's defaults.
    return model, False


def _resolve(info: ModelInfo, options: BuildOptions, args: dict, where: str, ckpt: RadioCheckpoint | None):
    return resolve_adaptor(
        options.adaptor_name,
        list(arg(args, "teachers", [])),
        info.config["tao_adaptor"],
        bool(arg(args, "cls_token_per_teacher", True)),
        where,
        ckpt.head_slots if ckpt is not None else None,
    )


def _stored_head(ckpt: RadioCheckpoint, adaptor: Adaptor, where: str) -> nn.Module:
    state = ckpt.heads.get(adaptor.name)
    if not state:
        held = ", ".join(sorted(ckpt.heads)) or "none"
        fix = (
            "add the name to config.json's adaptor_names when exporting, or use RADIO's torch.hub .pth.tar"
            if ckpt.layout == "huggingface"
            else "the file is incomplete"
        )
        raise ModelError(
            f"{where} has no summary head for teacher {adaptor.name!r} (_heads.{adaptor.index}.* / "
            f"_heads.{adaptor.name}.*; heads held: {held}): {fix}"
        )
    head = head_from_state(state, f"{where}, head of teacher {adaptor.name!r}")
    others = [f"{name}.*" for name in sorted(ckpt.heads) if name != adaptor.name]
    ckpt.mark_unused("summary heads of the other teachers", others)
    return head


def _report_unused(ckpt: RadioCheckpoint) -> None:
    for reason, keys in ckpt.unused.items():
        log.info("RADIO checkpoint %s: left out %d tensors: %s (e.g. %s)", ckpt.path, len(keys), reason, keys[0])


def _text_tower(info: ModelInfo, options: BuildOptions, adaptor: Adaptor):
    cfg = info.config
    source = options.text_pretrained_path
    if source and not os.path.exists(source):
        raise ModelError(f"model.text_pretrained_path {source!r} does not exist")
    fetch = options.pretrained or bool(options.pretrained_path)
    teacher = adaptor.teacher
    with seeded_init():
        if adaptor.type == "siglip2":
            text_config = None if (source or fetch) else cfg["text_configs"]["siglip2"]
            return siglip_text_tower(teacher, text_config, source, options.tokenizer_path)
        if not (source or fetch):
            teacher = {**teacher, "pretrained": ""}  # architecture only, no download
        return openclip_text_tower(teacher, source, options.canonicalize_text)


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


# -- RADIO's own code from a local clone ------------------------------------------------------------


def _build_from_hub_repo(info: ModelInfo, options: BuildOptions) -> tuple[RadioClipModel, bool]:
    """RADIO's ``radio_model`` from a local clone with no adaptors (so nothing is downloaded), then the
    chosen adaptor built by the clone's ``GenericAdaptor`` from the checkpoint; the text tower is ours."""
    repo = options.radio_repo_dir
    if not os.path.isfile(os.path.join(repo, "hubconf.py")):
        raise ModelError(f"model.radio_repo_dir {repo!r} holds no hubconf.py: give a local clone of NVlabs/RADIO")
    version = options.pretrained_path or info.config["radio_version"]
    try:
        radio, checkpoint = torch.hub.load(
            repo, "radio_model", source="local", version=version, adaptor_names=None, return_checkpoint=True
        )
    except Exception as exc:  # RADIO's loader raises whatever its dependencies raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch.hub.load({repo!r}, 'radio_model', version={version!r}) failed: {first}") from exc
    where = f"RADIO checkpoint {version!r}"
    ckpt = checkpoint_from_hub_dict(checkpoint, version)
    adaptor = _resolve(info, options, ckpt.args, where, None)
    head_state = ckpt.heads.get(adaptor.name)
    if not head_state:
        raise ModelError(f"{where} has no summary head for teacher {adaptor.name!r}: the file is incomplete")
    feature_state = {
        k[len(prefix) :]: v
        for prefix in (f"_feature_projections.{adaptor.index}.", f"_feature_projections.{adaptor.name}.")
        for k, v in checkpoint.get("state_dict_ema", checkpoint.get("state_dict", {})).items()
        if k.startswith(prefix)
    }
    state = {
        **{f"summary.{k}": v for k, v in head_state.items()},
        **{f"feature.{k}": v for k, v in feature_state.items()},
    }
    generic_adaptor = _radio_module(repo, "radio.adaptor_generic").GenericAdaptor
    try:
        # GenericAdaptor is what RADIO builds for any teacher type it has no special class for: the heads only.
        ada = generic_adaptor(checkpoint["args"], adaptor.teacher, state)
    except Exception as exc:  # RADIO's own code: its errors have many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"RADIO's GenericAdaptor cannot build the {adaptor.name!r} head of {where}: {first}") from exc
    ada.head_idx = adaptor.token_slot
    radio.adaptors[adaptor.name] = ada
    radio.max_token_slot = max(getattr(radio, "max_token_slot", -1), adaptor.token_slot)
    visual = HubRadioImageTower(radio, adaptor.name)
    text, tokenizer, text_loaded = _text_tower(info, options, adaptor)
    patch = getattr(radio, "patch_size", 16) or 16
    image_size = checked_image_size(info.name, options.image_size, info.image_size, patch)
    # RADIO's model conditions its input itself: feed it [0, 1] pixels.
    preprocess = Preprocess(image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    embed_dim = _output_dim(ada.head_mlp)
    if not text_loaded:
        log.warning("%s: the %s text tower is randomly initialised", info.name, adaptor.name)
    return RadioClipModel(info.name, visual, text, tokenizer, preprocess, embed_dim), False


def _radio_module(repo: str, name: str):
    """A module of the RADIO clone (``radio.*``), imported from ``repo`` as torch.hub's local source does."""
    import importlib

    sys.path.insert(0, repo)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelError(f"model.radio_repo_dir {repo!r} has no {name} ({exc}): give a clone of NVlabs/RADIO") from exc
    finally:
        sys.path.remove(repo)


def _output_dim(head: nn.Module) -> int:
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features

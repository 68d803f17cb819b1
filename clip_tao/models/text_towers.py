"""Text towers of Radio-CLIP's adaptor teachers, built and loaded without their image towers.

- ``siglip``: the SigLIP2 teacher's text model (transformers ``SiglipTextModel`` / ``Siglip2TextModel``,
  pooled output), Gemma tokenizer at length 64 with canonicalised text.
- ``clip``: the DFN CLIP teacher's text transformer (open_clip ``TextTransformer``), open_clip's BPE
  tokenizer at length 77.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from clip_tao.errors import ModelError
from clip_tao.models.hub_cli import download_command, prepare_hub
from clip_tao.models.tokenizer import HfTokenizer, OpenClipBpeTokenizer, Tokenizer

# RADIO's teacher model names -> the hub repository that holds the teacher's text tower.
SIGLIP_TEACHERS = {
    "siglip2-g-384": "google/siglip2-giant-opt-patch16-384",
    "siglip2-so400m": "google/siglip2-so400m-patch16-naflex",
}
OPENCLIP_TEACHERS = {("ViT-H-14-378-quickgelu", "dfn5b"): "apple/DFN5B-CLIP-ViT-H-14-378"}
OPEN_CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
SIGLIP_CONTEXT = 64


class SiglipTextTower(nn.Module):
    """``[B, 64]`` ids -> ``[B, D]`` pooled (last position) SigLIP text features."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.model = text_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).pooler_output

    def set_grad_checkpointing(self, enable: bool) -> None:
        from clip_tao.models.siglip_family import set_hf_grad_checkpointing

        set_hf_grad_checkpointing(self.model, enable)


class OpenClipTextTower(nn.Module):
    """``[B, 77]`` ids -> ``[B, D]`` open_clip text features (its own pooling and projection)."""

    def __init__(self, text_transformer: nn.Module):
        super().__init__()
        self.model = text_transformer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.model.set_grad_checkpointing(enable)


# -- SigLIP ----------------------------------------------------------------------------------------


def siglip_text_tower(
    teacher: dict, text_config: dict | None, source: str | None, tokenizer_path: str | None
) -> tuple[SiglipTextTower, Tokenizer, bool]:
    """The tower (from the folder ``source``, else the teacher's hub id, or random from ``text_config``) and its
    tokenizer. RADIO's SigLIP2 adaptor always canonicalises text, so this tokenizer does too."""
    hub_id = SIGLIP_TEACHERS.get(teacher.get("model", ""), teacher.get("model", ""))
    if source and not os.path.isdir(source):
        raise ModelError(
            f"model.text_pretrained_path {source!r} is not a folder: the siglip adaptor needs the teacher's "
            "save_pretrained folder"
        )
    if source is None and text_config is not None:
        from transformers import SiglipTextConfig, SiglipTextModel

        tower = SiglipTextModel(SiglipTextConfig(**text_config))
        loaded = False
    else:
        tower = _load_siglip_text(source or hub_id, is_local=source is not None)
        loaded = True
    tokenizer_source = tokenizer_path or source or hub_id
    tokenizer = HfTokenizer(tokenizer_source, SIGLIP_CONTEXT, canonicalize=True)
    return SiglipTextTower(tower), tokenizer, loaded


def _load_siglip_text(source: str, is_local: bool) -> nn.Module:
    from transformers import AutoConfig, Siglip2TextModel, SiglipTextModel

    from clip_tao.models.siglip_family import quiet_hf_loading

    if not is_local:
        prepare_hub()
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
        model_class = Siglip2TextModel if model_type == "siglip2" else SiglipTextModel
        with quiet_hf_loading():
            return model_class.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ModelError(f"cannot load the SigLIP text tower from {source!r}: {first}") from exc
        raise ModelError(
            f"the adaptor's text tower {source!r} is not reachable ({first}): pre-fetch it with "
            f"`{download_command(source)}` (then HF_HUB_OFFLINE=1 works) or set model.text_pretrained_path "
            "to a local save_pretrained folder"
        ) from exc


# -- open_clip -------------------------------------------------------------------------------------


def openclip_text_tower(
    teacher: dict, source: str | None, canonicalize: bool
) -> tuple[OpenClipTextTower, Tokenizer, bool]:
    """The teacher's open_clip text transformer: from an open_clip folder/file, the hub, or random init."""
    import open_clip
    from open_clip.model import _build_text_tower

    name = teacher.get("model", "ViT-H-14-378-quickgelu")
    folder_cfg = _open_clip_folder_config(source) if source and os.path.isdir(source) else None
    model_cfg = folder_cfg or open_clip.get_model_config(name)
    if model_cfg is None:
        raise ModelError(f"open_clip does not know the adaptor teacher {name!r}: give model.text_pretrained_path")
    text_cfg = {k: v for k, v in model_cfg["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    tower = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
    loaded = False
    weights = _open_clip_weights(teacher, name, source)
    if weights is not None:
        _load_text_weights(tower, weights)
        loaded = True
    tokenizer = OpenClipBpeTokenizer(text_cfg.get("context_length", 77), canonicalize)
    return OpenClipTextTower(tower), tokenizer, loaded


def _open_clip_folder_config(folder: str) -> dict:
    path = os.path.join(folder, "open_clip_config.json")
    if not os.path.isfile(path):
        raise ModelError(f"model.text_pretrained_path {folder!r} is a folder without open_clip_config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["model_cfg"]


def _open_clip_weights(teacher: dict, name: str, source: str | None) -> str | None:
    if source and os.path.isfile(source):
        return source
    if source:
        for file in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if os.path.isfile(os.path.join(source, file)):
                return os.path.join(source, file)
        raise ModelError(f"model.text_pretrained_path {source!r} holds no open_clip weights")
    repo = OPENCLIP_TEACHERS.get((name, teacher.get("pretrained", "")))
    if repo is None:
        return None
    from huggingface_hub import hf_hub_download

    prepare_hub()
    try:
        return hf_hub_download(repo, "open_clip_pytorch_model.bin")
    except Exception as exc:  # hub errors come in many types; all mean "not reachable"
        raise ModelError(
            f"the adaptor's text tower {repo!r} is not reachable ({type(exc).__name__}): pre-fetch it with "
            f"`{download_command(repo, 'open_clip_pytorch_model.bin')}` (then HF_HUB_OFFLINE=1 works) or set "
            "model.text_pretrained_path to the file"
        ) from exc


def _load_text_weights(tower: nn.Module, path: str) -> None:
    """The text keys of a whole open_clip CLIP state dict, loaded strictly into the text transformer."""
    from open_clip.factory import load_state_dict

    state = load_state_dict(path)
    text = {k: v for k, v in state.items() if k.startswith(OPEN_CLIP_TEXT_KEYS)}
    try:
        tower.load_state_dict(text, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"text weights in {path!r} do not fit the adaptor's text tower: {first}") from exc

"""Tiny published-format assets for the family tests, built from local files only (no network).

Each helper writes what a family's users download — a ``save_pretrained`` folder, an open_clip hub
folder, a RADIO ``{args, state_dict}`` checkpoint — but with random weights of a tiny size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CORPUS = [
    "a photo of a dog",
    "two cats sleeping on a red sofa",
    "the quick brown fox jumps over the lazy dog",
    "a blue circle on green",
    "a yellow square on a red background",
    "an image of people walking in a city at night",
] * 40

TINY_SIGLIP_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
GEMMA_SPECIAL_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
TINY_SIGLIP_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def make_gemma_tokenizer(folder: Path) -> Path:
    """A tiny sentencepiece BPE model (Gemma's special tokens and settings) saved as a Gemma tokenizer folder.

    Returns the sentencepiece ``.model`` file, the reference the tokenizer must agree with.
    """
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<mask>"],
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        split_by_whitespace=False,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    source = folder / "source"
    source.mkdir(exist_ok=True)
    (source / "tokenizer.model").write_bytes(prefix.with_suffix(".model").read_bytes())
    # SigLIP2's tokenizer settings: no BOS, EOS appended, padded on the right.
    tokenizer = GemmaTokenizer.from_pretrained(
        str(source), add_bos_token=False, add_eos_token=True, padding_side="right"
    )
    tokenizer.save_pretrained(str(folder))
    return prefix.with_suffix(".model")


def make_bert_vocab(folder: Path) -> Path:
    """A small uncased WordPiece vocabulary saved as a BERT tokenizer folder (bert-base-uncased's layout)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in CORPUS for w in line.split()})
    pieces = ["##s", "##ing", "##ed"] + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *list("abcdefghijklmnopqrstuvwxyz"), *words, *pieces]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True).save_pretrained(str(folder))
    return vocab_file


def make_siglip_folder(folder: Path, tokenizer_folder: Path) -> Path:
    """A tiny random ``SiglipModel`` saved with ``save_pretrained``, the Gemma tokenizer files beside it."""
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    text = {**TINY_SIGLIP_TEXT, **GEMMA_SPECIAL_IDS, "vocab_size": len(tokenizer), "max_position_embeddings": 64}
    torch.manual_seed(1)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=TINY_SIGLIP_VISION))
    with torch.no_grad():  # published weights have a trained scale and bias, not the init's zeros
        model.logit_scale.fill_(2.5)
        model.logit_bias.fill_(-7.0)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_naflex_folder(folder: Path, tokenizer_folder: Path, seed: int = 4) -> Path:
    """A tiny random ``Siglip2Model`` (NaFlex: patch 8, a 4x4 position table) saved with ``save_pretrained``,
    the Gemma tokenizer files beside it."""
    from transformers import AutoTokenizer, Siglip2Config, Siglip2Model

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    text = {**TINY_SIGLIP_TEXT, **GEMMA_SPECIAL_IDS, "vocab_size": len(tokenizer), "max_position_embeddings": 64}
    vision = {**TINY_SIGLIP_TEXT, "patch_size": 8, "num_patches": 16}
    torch.manual_seed(seed)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


TINY_NVCLIP = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 28,
        "layers": 2,
        "width": 32,
        "head_width": 16,
        "patch_size": 14,
        "no_ln_pre": True,
        "pool_type": "avg",
        "final_ln_after_pool": True,
        "pos_embed_type": "sin_cos_2d",
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 128,
        "width": 32,
        "heads": 2,
        "layers": 2,
        "pool_type": "last",
        "no_causal_mask": True,
    },
}


def make_openclip_folder(
    folder: Path, model_cfg: dict, tokenizer_folder: Path | None, seed: int = 2
) -> torch.nn.Module:
    """An open_clip ``CLIP`` saved as open_clip publishes to the hub: config, weights, tokenizer files."""
    from open_clip.model import CLIP

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip = CLIP(**model_cfg, init_logit_bias=-10.0)
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)
    torch.save(clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    if tokenizer_folder is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_folder)).save_pretrained(str(folder))
    return clip


# -- RADIO -----------------------------------------------------------------------------------------

# C-RADIOv3's teacher list (names and types as RADIO's args record them), plus a repeated name: RADIO
# gives one class token per UNIQUE name (4 here), padded with registers to a multiple of 8.
RADIO_TEACHERS = [
    {"name": "clip", "type": "open_clip", "model": "ViT-H-14-378-quickgelu", "pretrained": "dfn5b"},
    {"name": "siglip2-g", "type": "siglip2", "model": "siglip2-g-384"},
    {"name": "dino_v2", "type": "dino_v2"},
    {"name": "sam", "type": "sam"},
    {"name": "dino_v2", "type": "dino_v2", "input_size": 224},
]
RADIO_PATCH = 16
RADIO_HEAD_HIDDEN = 48


# The tiny backbone: ViT width 192, 3 heads, depth 2, LayerScale. Built as RADIO's own ``vit_huge_patch16_224``
# (radio/extra_timm_models.py, what C-RADIOv3-H uses) with smaller sizes, or as timm's stock
# ``vit_tiny_patch16_224``. RADIO renames LayerScale's ``gamma`` to ``grandma`` in the models it registers.
RADIO_TINY_VIT = {"patch_size": 16, "embed_dim": 192, "depth": 2, "num_heads": 3, "init_values": 1e-5}
RADIO_OWN_VITS = ("vit_huge_patch16_224", "vit_giant_patch16_224", "vit_so400m_patch16_224")


def radio_args(
    cpe_max_size: int = 128, teachers: list[dict] | None = None, model: str = "vit_huge_patch16_224", **extra
) -> argparse.Namespace:
    """Training args as RADIO pickles them (every field ``create_model_from_args`` reads), tiny sizes."""
    if model in RADIO_OWN_VITS:
        kwargs = {k: v for k, v in RADIO_TINY_VIT.items() if k != "patch_size"}
    else:
        kwargs = {"init_values": 1e-5, "depth": 2}
    return argparse.Namespace(
        model=model,
        model_kwargs=kwargs,
        cpe_max_size=cpe_max_size,
        teachers=teachers if teachers is not None else RADIO_TEACHERS,
        cls_token_per_teacher=True,
        register_multiple=8,
        mlp_version="v2",
        spectral_reparam=False,
        model_norm=False,
        dtype=torch.float32,  # RADIO pickles a torch.dtype (hubconf casts the backbone to it)
        # What create_model_from_args passes on to timm.create_model.
        in_chans=None,
        input_size=None,
        pretrained=False,
        num_classes=0,
        drop=0.0,
        drop_path=None,
        drop_block=None,
        gp=None,
        bn_momentum=None,
        bn_eps=None,
        torchscript=False,
        initial_checkpoint="",
        **extra,
    )


def _linear(name: str, out_dim: int, in_dim: int) -> dict:
    return {f"{name}.weight": torch.randn(out_dim, in_dim) * 0.1, f"{name}.bias": torch.randn(out_dim) * 0.1}


def _layer_norm(name: str, width: int) -> dict:
    return {f"{name}.weight": 1 + 0.1 * torch.randn(width), f"{name}.bias": 0.1 * torch.randn(width)}


def radio_head_tensors(prefix: str, version: str, dim: int, out_dim: int, num_inner: int = 1) -> dict:
    """One adaptor MLP's tensors under ``prefix``, named as RADIO's ``MLP`` (v1) / ``MLP2`` (v2) name them."""
    hidden = RADIO_HEAD_HIDDEN
    t = _linear(f"{prefix}fc1", hidden, dim)
    if version == "v2":
        for i in range(num_inner):
            t.update(_layer_norm(f"{prefix}blocks.{i}.0", hidden))
            t.update(_linear(f"{prefix}blocks.{i}.2", hidden, hidden))
        t.update(_layer_norm(f"{prefix}final.0", hidden))
        t.update(_linear(f"{prefix}final.2", out_dim, hidden))
    else:  # v1: fc1, norm, ReLU, inner = (Linear, LayerNorm, ReLU) x n flattened into one Sequential, fc2
        t.update(_layer_norm(f"{prefix}norm", hidden))
        for i in range(num_inner):
            t.update(_linear(f"{prefix}inner.{3 * i}", hidden, hidden))
            t.update(_layer_norm(f"{prefix}inner.{3 * i + 1}", hidden))
        t.update(_linear(f"{prefix}fc2", out_dim, hidden))
    return t


def radio_state(head_dims: dict[int, int], seed: int = 3, version: str = "v2", args=None) -> dict[str, torch.Tensor]:
    """A RADIO training state dict, key by key as ``create_model_from_args`` + RADIO's trainer lay it out.

    ``base_model.*``: the CPE patch generator (bias-free ``embedder``, 8 x 8 ``pos_embed`` grid for
    ``cpe_max_size`` 128, ``cls_token.token`` = 4 class tokens + 4 registers) and timm's ViT blocks with
    LayerScale (``grandma`` for RADIO's own ViT names, ``gamma`` for timm's); no ``norm.*`` (RADIO sets it to Identity without
    ``args.model_norm``). Then the input conditioner, ``summary_idxs``, ``_heads.<i>`` and
    ``_feature_projections.<i>`` per teacher index, and the dense ``_feature_normalizer``.
    """
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    args = args or radio_args()
    vit = VisionTransformer(**RADIO_TINY_VIT, num_classes=0)
    dim, patch = vit.embed_dim, RADIO_PATCH
    grid = args.cpe_max_size // patch
    layer_scale = ".grandma" if args.model in RADIO_OWN_VITS else ".gamma"
    state: dict[str, torch.Tensor] = {}
    for key, value in vit.state_dict().items():
        if key.startswith("blocks."):
            if key.endswith(".gamma"):
                # LayerScale is 1e-5 at init, which would hide the attention/MLP from the test.
                key, value = key[: -len(".gamma")] + layer_scale, torch.rand(dim) * 0.5 + 0.5
            state[f"base_model.{key}"] = value
    state["base_model.patch_generator.embedder.weight"] = torch.randn(dim, 3 * patch * patch) * 0.05
    state["base_model.patch_generator.pos_embed"] = torch.randn(1, grid * grid, dim) * 0.5
    # RADIO's ClsToken: one token per unique teacher name (or one), then cpe_num_registers registers or
    # padding up to the next multiple of register_multiple.
    names = list(dict.fromkeys(t["name"] for t in args.teachers))
    num_cls = len(names) if args.cls_token_per_teacher else 1
    multiple = getattr(args, "register_multiple", None)
    registers = getattr(args, "cpe_num_registers", None) or (multiple - num_cls % multiple if multiple else 0)
    state["base_model.patch_generator.cls_token.token"] = torch.randn(num_cls + registers, dim) * 0.5
    state["input_conditioner.norm_mean"] = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    state["input_conditioner.norm_std"] = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    state["summary_idxs"] = torch.tensor(
        sorted({t["name"]: i for i, t in reversed(list(enumerate(args.teachers)))}.values())
    )
    for index, out_dim in head_dims.items():
        state.update(radio_head_tensors(f"_heads.{index}.", version, dim, out_dim))
        state.update(radio_head_tensors(f"_feature_projections.{index}.", version, dim, 40))
    state["_feature_normalizer.mean"] = torch.randn(dim)
    state["_feature_normalizer.tx"] = torch.randn(dim, dim)
    return state


def make_radio_checkpoint(
    path: Path, head_dims: dict[int, int], seed: int = 3, version: str = "v2", args=None, ema: bool = True
) -> dict[str, torch.Tensor]:
    """A RADIO torch.hub file ``{args, state_dict, state_dict_ema}``; returns the weights RADIO would load.

    The released files store half-precision weights; the EMA copy is what RADIO's hubconf loads, so the
    plain ``state_dict`` holds different (wrong) values the loader must not pick.
    """
    args = args or radio_args()
    state = radio_state(head_dims, seed, version, args)
    state = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() and "conditioner" not in k else v) for k, v in state.items()
    }
    checkpoint = {"args": args, "state_dict_ema" if ema else "state_dict": state}
    if ema:
        checkpoint["state_dict"] = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save(checkpoint, path)
    return state


def _mlp_dims(state: dict[str, torch.Tensor], prefix: str) -> dict[str, int]:
    """What RADIO's get_mlp_info_from_state records for a v2 head in adaptor_configs."""
    hidden_dim, input_dim = state[f"{prefix}fc1.weight"].shape
    num_inner = sum(1 for k in state if k.startswith(f"{prefix}blocks.") and k.endswith(".0.weight"))
    output_dim = state[f"{prefix}final.2.weight"].shape[0]
    return {"input_dim": input_dim, "hidden_dim": hidden_dim, "output_dim": output_dim, "num_inner": num_inner}


def make_radio_hf_folder(folder: Path, state: dict[str, torch.Tensor], adaptor_names: list[str], args=None) -> Path:
    """The Hugging Face layout of the same weights, as RADIO's ``hf_hub.py`` writes it: ``config.json``
    (``RADIOConfig``: args with dtype as a string, adaptor_names, adaptor_configs with head_idx) and
    ``model.safetensors`` with ``radio_model.*`` keys."""
    from safetensors.torch import save_file

    args = args or radio_args()
    folder.mkdir(parents=True, exist_ok=True)
    teachers = args.teachers
    out = {}
    for key, value in state.items():
        if key.startswith("base_model."):
            out["radio_model.model." + key[len("base_model.") :]] = value
        elif key.startswith("input_conditioner."):
            out["radio_model." + key] = value
    out["radio_model.summary_idxs"] = torch.tensor([i for i, t in enumerate(teachers) if t.get("use_summary", True)])
    adaptor_configs = {}
    for name in adaptor_names:
        index = next(i for i, t in enumerate(teachers) if t["name"] == name)
        for src, dst in ((f"_heads.{index}.", "head_mlp."), (f"_feature_projections.{index}.", "feat_mlp.")):
            for key, value in state.items():
                if key.startswith(src):
                    out[f"radio_model.adaptors.{name}.{dst}{key[len(src) :]}"] = value
        adaptor_configs[name] = {
            "summary": _mlp_dims(state, f"_heads.{index}."),
            "feature": {
                **_mlp_dims(state, f"_feature_projections.{index}."),
                "upsample_factor": 1,
                "upsample_rank": None,
            },
            "head_idx": teachers[index].get("token_slot", index),
        }
    config = {
        "args": {**vars(args), "dtype": str(args.dtype).split(".")[-1]},
        "version": "c-radio_v3-b",
        "patch_size": RADIO_PATCH,
        "max_resolution": 2048,
        "preferred_resolution": [512, 512],
        "adaptor_names": adaptor_names,
        "adaptor_configs": adaptor_configs,
        "vitdet_window_size": None,
        "feature_normalizer_config": None,
        "architectures": ["RADIOModel"],
        "model_type": "radio",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    return folder

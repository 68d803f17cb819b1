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

RADIO_TEACHERS = [
    {"name": "clip", "type": "open_clip", "model": "ViT-H-14-378-quickgelu", "pretrained": "dfn5b"},
    {"name": "siglip2-g", "type": "siglip2", "model": "siglip2-g-384"},
    {"name": "dino_v2", "type": "dino_v2"},
]


def radio_args(cpe_max_size: int = 128) -> argparse.Namespace:
    """Training args as RADIO pickles them, for a ``vit_tiny``-size backbone (3 teachers -> 3 CLS + 5 registers)."""
    return argparse.Namespace(
        model="vit_tiny_patch16_224",
        model_kwargs={"init_values": 1e-5, "depth": 2},
        cpe_max_size=cpe_max_size,
        teachers=RADIO_TEACHERS,
        cls_token_per_teacher=True,
        register_multiple=8,
        mlp_version="v2",
        spectral_reparam=False,
        dtype="bfloat16",
        gp=None,
        drop_path=None,
    )


def make_radio_checkpoint(path: Path, head_dims: dict[int, int], seed: int = 3) -> dict[str, torch.Tensor]:
    """A RADIO ``{args, state_dict}`` file written key by key as RADIO's trainer lays it out.

    The ViT blocks come from timm's ``vit_tiny`` (LayerScale stored under RADIO's name ``grandma``); the
    patch generator, input conditioner and adaptor MLP v2 heads are plain tensors. Returns the state dict.
    """
    import timm

    torch.manual_seed(seed)
    args = radio_args()
    vit = timm.create_model(args.model, pretrained=False, num_classes=0, **args.model_kwargs)
    dim, patch = vit.embed_dim, 16
    grid = args.cpe_max_size // patch
    state: dict[str, torch.Tensor] = {}
    for key, value in vit.state_dict().items():
        if key.startswith(("blocks.", "norm.")):
            state[f"base_model.{key.replace('.gamma', '.grandma')}"] = value
    # LayerScale is 1e-5 at init, which would hide the attention/MLP from the test: use visible values.
    for key in state:
        if key.endswith(".grandma"):
            state[key] = torch.rand(dim) * 0.5 + 0.5
    state["base_model.patch_generator.embedder.weight"] = torch.randn(dim, 3 * patch * patch) * 0.05
    state["base_model.patch_generator.pos_embed"] = torch.randn(1, grid * grid, dim) * 0.5
    state["base_model.patch_generator.cls_token.token"] = torch.randn(8, dim) * 0.5
    state["input_conditioner.norm_mean"] = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    state["input_conditioner.norm_std"] = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    state["summary_idxs"] = torch.tensor([0, 1, 2])
    for index, out_dim in head_dims.items():
        hidden = 48
        for prefix in (f"_heads.{index}.", f"_feature_projections.{index}."):
            state[f"{prefix}fc1.weight"] = torch.randn(hidden, dim) * 0.1
            state[f"{prefix}fc1.bias"] = torch.randn(hidden) * 0.1
            state[f"{prefix}blocks.0.0.weight"] = 1 + 0.1 * torch.randn(hidden)
            state[f"{prefix}blocks.0.0.bias"] = 0.1 * torch.randn(hidden)
            state[f"{prefix}blocks.0.2.weight"] = torch.randn(hidden, hidden) * 0.1
            state[f"{prefix}blocks.0.2.bias"] = torch.randn(hidden) * 0.1
            state[f"{prefix}final.0.weight"] = 1 + 0.1 * torch.randn(hidden)
            state[f"{prefix}final.0.bias"] = 0.1 * torch.randn(hidden)
            state[f"{prefix}final.2.weight"] = torch.randn(out_dim, hidden) * 0.1
            state[f"{prefix}final.2.bias"] = torch.randn(out_dim) * 0.1
    # RADIO releases store bf16/half weights ("_half.pth.tar"); the loader must cast them.
    state = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() and "conditioner" not in k else v) for k, v in state.items()
    }
    torch.save({"args": args, "state_dict": state}, path)
    return state

"""Model types as TAO 7.0.1 has them: its NV-CLIP architectures (incl. -84) and the open_clip fallback."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from clip_tao.errors import ModelError
from clip_tao.models import create_model, get_model_info

TAO_NVCLIP = json.loads((Path(__file__).parent / "data" / "tao_7.0.1_clip_schema.json").read_text())[
    "nvclip_model_configs"
]
# How TAO's config names the tokenizer; ours keeps it beside the architecture. Patch dropout 0 is the default.
_TOKENIZER_KEYS = ("hf_tokenizer_name", "tokenizer_kwargs")


@pytest.mark.parametrize("name", sorted(TAO_NVCLIP))
def test_nvclip_architectures_are_taos(name):
    tao = TAO_NVCLIP[name]
    ours = get_model_info(name)
    assert ours.family == "openclip"
    assert ours.config["embed_dim"] == tao["embed_dim"] and ours.config["init_logit_bias"] == tao["init_logit_bias"]
    tao_vision = {k: v for k, v in tao["vision_cfg"].items() if k != "patch_dropout"}
    assert ours.config["vision_cfg"] == tao_vision
    assert ours.config["text_cfg"] == {k: v for k, v in tao["text_cfg"].items() if k not in _TOKENIZER_KEYS}
    assert ours.config["tokenizer_id"] == tao["text_cfg"]["hf_tokenizer_name"]
    assert ours.config["strip_sep_token"] == tao["text_cfg"]["tokenizer_kwargs"]["strip_sep_token"]
    assert ours.image_size == tao["vision_cfg"]["image_size"]
    assert ours.context_length == tao["text_cfg"]["context_length"]


def test_any_open_clip_name_is_a_type():
    """TAO builds names it does not list with open_clip; so do we, equal to open_clip's own model."""
    model = create_model("ViT-S-32", pretrained=False)
    reference = open_clip.create_model("ViT-S-32")
    reference.load_state_dict({k: v for k, v in model.model.state_dict().items() if k != "logit_bias"}, strict=False)
    reference.eval()
    model.eval()
    pixels = torch.randn(2, 3, 224, 224)
    texts = ["a photo of a dog", "a cat"]
    ids = model.tokenizer(texts)
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-S-32")(texts))
    with torch.no_grad():
        assert (model.encode_image(pixels) - reference.encode_image(pixels, normalize=True)).abs().max() <= 1e-5
        assert (model.encode_text(ids) - reference.encode_text(ids, normalize=True)).abs().max() <= 1e-5
    assert model.embed_dim == 384 and model.image_size == 224 and model.logit_bias.shape == ()


def test_open_clip_weights_from_a_file_and_bad_tags(tmp_path):
    source = open_clip.create_model("ViT-S-32")
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = create_model("ViT-S-32", pretrained_path=str(tmp_path / "w.pt"))
    torch.testing.assert_close(model.model.visual.conv1.weight, source.visual.conv1.weight)
    with pytest.raises(ModelError, match="neither an existing file nor an open_clip pretrained tag of ViT-S-32"):
        create_model("ViT-S-32", pretrained_path="no-such-tag")
    with pytest.raises(ModelError, match="not a known model type"):
        create_model("ViT-Q-99")

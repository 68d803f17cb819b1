"""Our schema against TAO 7.0.1's, key by key.

``tests/data/tao_7.0.1_clip_schema.json`` was written by ``scripts/extract_tao_schema.py``, which runs
TAO's own config dataclasses (``nvidia_tao_pytorch/config/clip/default_config.py`` and the common
configs it builds on): ``default_spec`` is every default as the JSON TAO's remote client sends, ``keys``
every dotted key with TAO's type.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clip_tao.config import all_keys, load_experiment
from clip_tao.config.loader import config_to_dict

TAO = json.loads((Path(__file__).parent / "data" / "tao_7.0.1_clip_schema.json").read_text())

# Where our default differs on purpose (README, "Coming from TAO"): the model's own size instead of
# TAO's 256 (which fits only 256-px models), and results_dir, which TAO fills in from its launcher.
DELIBERATE_DEFAULTS = {
    "results_dir": (None, ""),
    "model.image_size": (None, 256),
    "export.input_height": (None, 256),
    "export.input_width": (None, 256),
}


def _leaves(value: dict, prefix: str = "") -> dict:
    out = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_leaves(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def test_every_tao_key_is_in_our_schema():
    ours = set(all_keys())
    missing = sorted(k.replace("[]", "") for k in TAO["keys"] if k.replace("[]", "") not in ours)
    assert not missing, f"TAO keys we lack: {missing}"


def test_every_default_is_taos_or_a_documented_difference(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"results_dir": "/r"}))
    ours = _leaves(config_to_dict(load_experiment(spec)))
    ours["results_dir"] = None  # set above only because it is required
    differing = {}
    for key, tao_value in _leaves(TAO["default_spec"]).items():
        if ours[key] != tao_value:
            differing[key] = (ours[key], tao_value)
    assert differing == DELIBERATE_DEFAULTS


def test_taos_full_default_spec_loads_unchanged(tmp_path):
    """The whole default spec, as TAO's remote client sends it (JSON), with a results_dir."""
    spec = dict(TAO["default_spec"], results_dir=str(tmp_path / "r"))
    path = tmp_path / "tao_default.json"
    path.write_text(json.dumps(spec))
    cfg = load_experiment(path)
    assert cfg.peft.method == "lora" and cfg.peft.vision.target_modules == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert cfg.regularization.similarity_weight == pytest.approx(0.1)
    assert cfg.wandb.enable is True and cfg.wandb.tags == ["training", "tao-toolkit"]
    assert cfg.model.image_size == 256  # TAO's value, given explicitly, is honoured
    assert dataclasses.asdict(cfg.evaluate)["text_file"] is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("peft.vision.rank=0", "peft.vision.rank=0 must be >= 1"),
        ("peft.method=ia3", "peft.method='ia3' (str) is not allowed; choose one of lora"),
        ("peft.text.dropout=1.5", "peft.text.dropout=1.5 must be in [0, 1]"),
        ("regularization.cosine_weight=-1", "regularization.cosine_weight=-1.0 must be >= 0"),
        ("peft.enabled=true train.distributed_strategy=fsdp", "peft.enabled=true with train.distributed_strategy=fsdp"),
    ],
)
def test_bad_peft_and_regularization_values(tmp_path, override, message):
    from clip_tao.errors import ConfigError

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"results_dir": "/r"}))
    with pytest.raises(ConfigError) as info:
        load_experiment(path, override.split())
    assert message in str(info.value) and "\n" not in str(info.value)

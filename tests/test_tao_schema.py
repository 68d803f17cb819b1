"""Our schema against TAO 7.0.1's and TAO 7.3's, key by key.

``tests/data/tao_7.0.1_clip_schema.json`` and ``tao_7.3_clip_schema.json`` were written by
``scripts/extract_tao_schema.py``, which runs TAO's own config dataclasses (7.0.1:
``nvidia_tao_pytorch/config/clip/default_config.py``; 7.3: ``nvidia_tao_core/config/clip/default_config.py``,
with the common configs they build on; the script's docstring names the commits): ``default_spec`` is every
default as the JSON TAO's remote client sends, ``keys`` every dotted key with TAO's type, and for 7.3
``valid_options`` / ``valid_ranges`` the choices and bounds TAO's fields declare.
``tests/data/tao_7.3/*.yaml`` are spec files TAO ships after 7.0.1, unchanged (the template
``experiment_spec.yaml`` at tao-pytorch 00c05f09 and ``experiment_siglip2_pas_v3_1_dual_tower_lora_r64_last24.yaml``
at 5b8b5d3f, ``..._metadata_masked_source_augmented.yaml`` at f076fee6).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from clip_tao.config import all_keys, load_experiment
from clip_tao.config.loader import config_to_dict
from clip_tao.config.schema import ExperimentConfig
from clip_tao.errors import ConfigError

DATA = Path(__file__).parent / "data"
TAO = json.loads((DATA / "tao_7.0.1_clip_schema.json").read_text())
TAO73 = json.loads((DATA / "tao_7.3_clip_schema.json").read_text())
SCHEMAS = {"7.0.1": TAO, "7.3": TAO73}

# Where our default differs on purpose (README, "Coming from TAO"): the model's own size instead of
# TAO's 256 (which fits only 256-px models), and results_dir, which TAO fills in from its launcher.
DELIBERATE_DEFAULTS = {
    "results_dir": (None, ""),
    "model.image_size": (None, 256),
    "export.input_height": (None, 256),
    "export.input_width": (None, 256),
    # 7.0.1/7.2's per-tower switch: null = not given (then false's meaning, frozen), so that a mode beside it
    # can be told from a contradiction.
    "peft.vision.enabled": (None, False),
    "peft.text.enabled": (None, False),
}
# TAO 7.3 dropped ``enabled`` for ``mode`` (default frozen). Ours defaults to "legacy" (TAO's own name for "from
# enabled"), which is frozen unless a 7.2 spec sets enabled: true.
DELIBERATE_DEFAULTS_73 = {
    "results_dir": (None, ""),
    "model.image_size": (None, 256),
    "export.input_height": (None, 256),
    "export.input_width": (None, 256),
    "peft.vision.mode": ("legacy", "frozen"),
    "peft.text.mode": ("legacy", "frozen"),
}
# Bounds TAO declares that we do not apply: export sizes, which TAO bounds at 32 px; ours follow the model
# (small test models are 28 px).
LOOSER_RANGES = {"export.input_height", "export.input_width"}
# Bounds where TAO's own bound is refused too: Adam's eps=0 divides by zero where a gradient is zero.
STRICTER_RANGES = {"train.optim.eps"}


def _leaves(value: dict, prefix: str = "") -> dict:
    out = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_leaves(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


@pytest.mark.parametrize("version", SCHEMAS)
def test_every_tao_key_is_in_our_schema(version):
    ours = set(all_keys())
    missing = sorted(k.replace("[]", "") for k in SCHEMAS[version]["keys"] if k.replace("[]", "") not in ours)
    assert not missing, f"TAO {version} keys we lack: {missing}"


@pytest.mark.parametrize(("version", "deliberate"), [("7.0.1", DELIBERATE_DEFAULTS), ("7.3", DELIBERATE_DEFAULTS_73)])
def test_every_default_is_taos_or_a_documented_difference(tmp_path, version, deliberate):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"results_dir": "/r"}))
    ours = _leaves(config_to_dict(load_experiment(spec)))
    ours["results_dir"] = None  # set above only because it is required
    differing = {}
    for key, tao_value in _leaves(SCHEMAS[version]["default_spec"]).items():
        if ours[key] != tao_value:
            differing[key] = (ours[key], tao_value)
    assert differing == deliberate


def _hint(key: str):
    cls: typing.Any = ExperimentConfig
    for part in key.replace("[]", "").split("."):
        hint = typing.get_type_hints(cls)[part]
        cls = _unwrap(hint)
    return hint


def _unwrap(hint):
    for arg in typing.get_args(hint) or ():
        if dataclasses.is_dataclass(arg) or typing.get_args(arg):
            return _unwrap(arg)
    return hint


def _choices(hint) -> set:
    if typing.get_origin(hint) is typing.Literal:
        return set(typing.get_args(hint))
    return {c for arg in typing.get_args(hint) for c in _choices(arg)}


def test_every_tao_73_choice_is_accepted():
    """Each ``valid_options`` value of TAO 7.3's fields is a value of our key (ours may offer more)."""
    missing = {}
    for key, options in TAO73["valid_options"].items():
        ours = _choices(_hint(key))
        if not set(options) <= ours:
            missing[key] = sorted(set(options) - ours)
    assert not missing


@pytest.mark.parametrize("key", sorted(k for k in TAO73["valid_ranges"] if "[]" not in k))
def test_tao_73_lower_bounds_are_applied(tmp_path, key):
    """One step under TAO's ``valid_min`` is refused with a line naming the key; the bound itself loads."""
    low, high = TAO73["valid_ranges"][key]
    if low is None or key in LOOSER_RANGES:
        pytest.skip("no lower bound" if low is None else "deliberately looser (see LOOSER_RANGES)")
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"results_dir": "/r"}))
    is_int = _unwrap(_hint(key)) is int
    below = low - 1 if is_int else low - 0.5
    with pytest.raises(ConfigError) as info:
        load_experiment(path, [f"{key}={below}"])
    assert key in str(info.value) and "\n" not in str(info.value)
    if key not in STRICTER_RANGES:
        load_experiment(path, [f"{key}={low}"])
    if high not in (None, "inf"):
        with pytest.raises(ConfigError):
            load_experiment(path, [f"{key}={high + 0.5}"])


def test_taos_73_template_spec_loads_with_the_launchers_values(tmp_path):
    """TAO's template ``experiment_spec.yaml``: its ``???`` values are the ones TAO's launcher fills in."""
    cfg = load_experiment(
        DATA / "tao_7.3" / "experiment_spec.yaml",
        [
            f"results_dir={tmp_path / 'r'}",
            "dataset.train.datasets.0.image_dir=/data/images",
            "dataset.train.datasets.0.caption_dir=/data/captions",
            "model.type=siglip2-so400m-patch16-256",
            "evaluate.checkpoint=/r/train/clip_latest.pth",
            "inference.checkpoint=/r/train/clip_latest.pth",
            "export.checkpoint=/r/train/clip_latest.pth",
            "export.onnx_file=/r/export/clip.onnx",
        ],
    )
    t = cfg.train
    assert (t.siglip_loss_dist_impl, t.siglip_loss_mask_mode, t.compatible_positive_normalization) == (
        "gather",
        "none",
        "per_query",
    )
    assert t.num_epochs == 100 and t.checkpoint_interval == 10 and t.triplet_margin == pytest.approx(0.2)
    assert cfg.dataset.train.unique_caption_per_batch is True and cfg.dataset.train.balance_query_types is False
    assert cfg.dataset.train.datasets[0].train_pairs_file is None
    assert cfg.dataset.val.metadata_match_mode == "scalar_attributes"
    assert cfg.evaluate.pas_ground_truth_mode == "paired_caption"


def test_taos_73_dual_tower_lora_spec_loads_unchanged(tmp_path):
    """TAO's r64/last-24 dual-tower LoRA spec: results_dir comes from the launcher, as its header says."""
    path = DATA / "tao_7.3" / "experiment_siglip2_pas_v3_1_dual_tower_lora_r64_last24.yaml"
    cfg = load_experiment(path, [f"results_dir={tmp_path / 'r'}"])
    for tower in (cfg.peft.vision, cfg.peft.text):
        assert tower.resolved_mode() == "lora" and (tower.rank, tower.alpha, tower.num_last_blocks) == (64, 128, 24)
    assert cfg.peft.enabled and cfg.peft.train_logit_calibration
    assert cfg.train.checkpointer.filename == "model_best_{epoch:03d}" and not cfg.train.checkpointer.enable_topk
    assert cfg.train.siglip_loss_mask_mode == "attribute_plus_accessory_match_ignore"
    assert cfg.dataset.train.include_attribute_metadata and not cfg.dataset.train.unique_caption_per_batch
    assert cfg.dataset.train.datasets[0].train_pairs_file.endswith("/train_pairs.json")
    assert cfg.dataset.val.metadata_match_eval and cfg.dataset.val.metadata_match_mode == "scalar_plus_accessories"
    assert cfg.evaluate.pas_ground_truth_mode == "scalar_plus_accessories"
    assert cfg.wandb.group == "" and cfg.wandb.run_id == ""
    assert cfg.train.cudnn.deterministic is False and cfg.train.num_gpus == 8


@pytest.mark.parametrize("version", SCHEMAS)
def test_taos_full_default_spec_loads_unchanged(tmp_path, version):
    """The whole default spec, as TAO's remote client sends it (JSON), with a results_dir."""
    spec = dict(SCHEMAS[version]["default_spec"], results_dir=str(tmp_path / "r"))
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
        (
            "peft.vision.enabled=true peft.vision.mode=full",
            "peft.vision.enabled=true (which means mode lora) contradicts peft.vision.mode=full",
        ),
        (
            "peft.text.enabled=false peft.text.mode=lora",
            "peft.text.enabled=false (which means mode frozen) contradicts peft.text.mode=lora",
        ),
        ("peft.text.mode=partial", "peft.text.mode='partial' (str) is not allowed"),
        ("train.siglip_loss_dist_impl=ring", "train.siglip_loss_dist_impl='ring' (str) is not allowed"),
        ("train.checkpointer.save_top_k=0", "train.checkpointer.save_top_k=0 must be >= 1"),
        ("peft.method=ia3", "peft.method='ia3' (str) is not allowed; choose one of lora"),
        ("peft.text.dropout=1.5", "peft.text.dropout=1.5 must be in [0, 1]"),
        ("regularization.cosine_weight=-1", "regularization.cosine_weight=-1.0 must be >= 0"),
        ("peft.enabled=true train.distributed_strategy=fsdp", "peft.enabled=true with train.distributed_strategy=fsdp"),
    ],
)
def test_bad_peft_and_regularization_values(tmp_path, override, message):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"results_dir": "/r"}))
    with pytest.raises(ConfigError) as info:
        load_experiment(path, override.split())
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("tower", "expected"),
    [
        ({"enabled": True}, "lora"),  # TAO 7.2 form
        ({"enabled": False}, "frozen"),
        ({}, "frozen"),
        ({"mode": "full"}, "full"),  # TAO 7.3 form
        ({"mode": "lora", "enabled": True}, "lora"),  # both, agreeing
        ({"mode": "frozen", "enabled": False}, "frozen"),
        ({"mode": "legacy", "enabled": True}, "lora"),  # TAO's transitional schema
    ],
)
def test_tower_mode_from_either_form(tmp_path, tower, expected):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"results_dir": "/r", "peft": {"enabled": True, "vision": tower}}))
    assert load_experiment(path).peft.vision.resolved_mode() == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.siglip_loss_mask_mode=attribute_match_ignore"],
            "train.siglip_loss_mask_mode=attribute_match_ignore needs the attribute metadata in the batches",
        ),
        (
            [
                "train.siglip_loss_mask_mode=attribute_match_ignore",
                "dataset.train.include_attribute_metadata=true",
                "train.siglip_loss_dist_impl=bidir",
            ],
            "works with train.siglip_loss_dist_impl local or gather, not bidir",
        ),
        (
            [
                "train.siglip_loss_mask_mode=attribute_match_positive",
                "dataset.train.include_attribute_metadata=true",
                "train.triplet_loss_weight=0.5",
            ],
            "train.triplet_loss_weight=0.5 with train.siglip_loss_mask_mode=attribute_match_positive",
        ),
    ],
)
def test_taos_loss_key_preconditions_are_one_line(tiny_spec, capsys, overrides, message):
    from clip_tao.cli import main

    spec = tiny_spec("tiny-siglip2")
    assert main(["train", "-e", str(spec), "wandb.enable=false", *overrides]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_taos_legacy_enabled_form_spec_loads(tmp_path):
    """NVIDIA's ``..._metadata_masked_source_augmented.yaml`` (tao-pytorch f076fee6) writes 7.2's per-tower
    ``enabled``, which TAO 7.3's final schema rejects; it loads here, both towers frozen (PEFT off)."""
    path = DATA / "tao_7.3" / "experiment_siglip2_pas_v3_1_metadata_masked_source_augmented.yaml"
    launcher = [f"results_dir={tmp_path / 'r'}", "evaluate.checkpoint=/c.pth", "inference.checkpoint=/c.pth",
                "export.checkpoint=/c.pth", "export.onnx_file=/c.onnx"]  # fmt: skip
    cfg = load_experiment(path, launcher)
    assert cfg.peft.vision.enabled is False and cfg.peft.vision.resolved_mode() == "frozen"
    assert cfg.train.siglip_loss_mask_mode == "attribute_plus_accessory_match_ignore"
    assert cfg.train.optim.text_lr == pytest.approx(1e-7) and cfg.dataset.val.metadata_match_eval
    assert cfg.model.init_logit_scale is None and cfg.evaluate.pas_ground_truth_mode == "scalar_plus_accessories"


def test_taos_73_dual_tower_lora_spec_trains_evaluates_and_exports(tmp_path, caplog):
    """TAO's r64/last-24 LoRA spec file as shipped, run through train, evaluate and export. Overridden: what TAO's
    launcher supplies (results_dir, the data paths, the GPU count, the checkpoint) and what a 2-CPU test can hold
    (the tiny SigLIP2 in place of so400m, one epoch, small batches, no loader workers). Everything else is the
    file's: dual-tower LoRA on q/k/v/out_proj, the attribute+accessory mask, metadata-match validation and its
    PAS evaluation, TAO's checkpointer keys, fp16 (fp32 on a CPU, with a warning)."""
    import shutil

    from clip_tao.cli import main
    from tests.test_pas_metadata import _pas_dataset

    root, _ = _pas_dataset(tmp_path / "pas")
    shutil.copy(root / "train_list.txt", root / "val_list.txt")
    shutil.copy(root / "train_pairs.json", root / "val_pairs.json")  # validation's <stem>_list -> <stem>_pairs
    spec = DATA / "tao_7.3" / "experiment_siglip2_pas_v3_1_dual_tower_lora_r64_last24.yaml"
    folders = f"image_dir: {root / 'images'}, caption_dir: {root / 'captions'}"
    results = tmp_path / "r"
    launcher = [
        f"results_dir={results}",
        f"dataset.train.datasets=[{{{folders}, image_list_file: {root / 'train_list.txt'}, "
        f"train_pairs_file: {root / 'train_pairs.json'}}}]",
        f"dataset.val.datasets=[{{{folders}, image_list_file: {root / 'val_list.txt'}}}]",
        "train.num_gpus=1",
        "train.gpu_ids=[0]",
    ]
    small = ["model.type=tiny-siglip2", "train.num_epochs=1", "dataset.train.batch_size=8", "dataset.val.batch_size=8",
             "dataset.train.num_workers=0", "dataset.val.num_workers=0", "evaluate.num_workers=0",
             "evaluate.batch_size=8", "wandb.enable=false"]  # fmt: skip
    import logging

    with caplog.at_level(logging.INFO, logger="clip_tao"):
        assert main(["train", "-e", str(spec), *launcher, *small]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("trainable parameters"))
    assert "vision (lora)" in line and "text (lora)" in line and "modules with LoRA" in line
    lines = [json.loads(x) for x in (results / "train" / "status.json").read_text().splitlines()]
    kpi = next(x["kpi"] for x in reversed(lines) if "val/pas/overall_mAP" in x.get("kpi", {}))
    assert 0 <= float(kpi["val/pas/overall_mAP"]) <= 1 and "pas/overall_t2i_R@1" in kpi
    checkpoint = results / "train" / "clip_latest.pth"
    assert main(["evaluate", "-e", str(spec), *launcher, *small, f"evaluate.checkpoint={checkpoint}"]) == 0
    tested = [json.loads(x) for x in (results / "evaluate" / "status.json").read_text().splitlines()][-1]["kpi"]
    assert float(tested["test/pas/overall_mAP"]) == pytest.approx(float(kpi["val/pas/overall_mAP"]), abs=1e-5)
    onnx = tmp_path / "clip.onnx"
    assert main(["export", "-e", str(spec), *launcher, *small, f"export.checkpoint={checkpoint}",
                 f"export.onnx_file={onnx}", "export.on_cpu=true"]) == 0  # fmt: skip
    assert onnx.is_file()

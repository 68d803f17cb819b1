import json

import pytest

from clip_tao.config import all_keys, load_experiment
from clip_tao.errors import ConfigError
from tests.conftest import write_spec

# A spec in TAO's own format, every section present (TAO 7.0.1 keys).
TAO_SPEC = """
results_dir: /results/clip
encryption_key: tlt_encode
model_name: clip
wandb: {enable: false, project: clip, tags: [a, b]}
model:
  type: siglip2-so400m-patch16-256
  adaptor_name: null
  freeze_vision_encoder: false
  freeze_text_encoder: true
  image_size: 256
  init_logit_scale: null
  init_logit_bias: null
  canonicalize_text: true
dataset:
  seed: 42
  pin_memory: true
  train:
    type: custom
    batch_size: 16
    num_workers: 8
    datasets:
      - image_dir: /data/images
        caption_dir: /data/captions
        caption_file_suffix: .txt
        image_list_file: null
    wds: {root_dir: /data/shards, shard_list_file: null, samples_per_shard: 10000}
  val:
    batch_size: 16
    num_workers: 8
    datasets: [{image_dir: /data/val}]
  augmentation:
    scale: [0.4, 1.0]
    color_jitter: [0.8, 0.32, 0.32, 0.32, 0.08]
    grayscale: 0.2
train:
  num_gpus: 1
  gpu_ids: [0]
  num_nodes: 1
  seed: 1234
  cudnn: {benchmark: false, deterministic: true}
  num_epochs: 10
  checkpoint_interval: 1
  checkpoint_interval_unit: epoch
  validation_interval: 1
  val_check_interval: null
  resume_training_checkpoint_path: null
  pretrained_model_path: null
  loss_type: siglip
  precision: fp16
  grad_clip_norm: null
  grad_checkpointing: false
  distributed_strategy: ddp
  optim:
    optimizer_type: adamw
    vision_lr: 1e-4
    text_lr: 1e-5
    weight_decay: 1e-4
    betas: [0.9, 0.95]
    eps: 1e-6
    warmup_steps: 100
    scheduler: cosine
evaluate:
  checkpoint: ${results_dir}/train/clip_latest.pth
  trt_engine: null
  datasets: [{image_dir: /data/test}]
  batch_size: 16
  num_workers: 8
  num_gpus: 1
  gpu_ids: [0]
inference:
  checkpoint: null
  text_file: /data/prompts.txt
  datasets: [{image_dir: /data/test}]
  batch_size: 16
export:
  checkpoint: null
  onnx_file: /results/clip/export/clip.onnx
  encoder_type: separate
  opset_version: 17
  batch_size: -1
  input_height: 256
  input_width: 256
  input_channel: 3
  gpu_id: 0
  on_cpu: false
  verbose: false
gen_trt_engine:
  onnx_file: /results/clip/export/clip.onnx
  trt_engine: /results/clip/deploy/clip.engine
  batch_size: -1
  gpu_id: 0
  timing_cache: null
  verbose: false
  tensorrt:
    data_type: fp16
    workspace_size: 4096
    min_batch_size: 1
    opt_batch_size: 1
    max_batch_size: 16
    layers_precision: []
"""


@pytest.fixture
def tao_spec(tmp_path):
    path = tmp_path / "tao.yaml"
    path.write_text(TAO_SPEC)
    return path


def test_tao_spec_loads_unchanged(tao_spec):
    cfg = load_experiment(tao_spec)
    assert cfg.model.freeze_text_encoder is True
    assert cfg.train.optim.vision_lr == pytest.approx(1e-4)  # YAML 1e-4 is a float, not a string
    assert cfg.train.optim.text_lr == pytest.approx(1e-5)
    assert cfg.evaluate.checkpoint == "/results/clip/train/clip_latest.pth"  # interpolation resolved
    assert cfg.dataset.train.datasets[0].caption_dir == "/data/captions"
    assert cfg.dataset.val.datasets[0].caption_file_suffix == ".txt"  # default filled in
    assert cfg.gen_trt_engine.tensorrt.max_batch_size == 16
    assert cfg.task_dir("train") == "/results/clip/train"


def test_json_spec_is_accepted(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"results_dir": "/r", "train": {"num_epochs": 3}}))
    assert load_experiment(path).train.num_epochs == 3


def test_defaults_match_tao(tmp_path):
    cfg = load_experiment(write_spec(tmp_path / "s.yaml", {"results_dir": "/r"}))
    assert cfg.model.type == "siglip2-so400m-patch16-256"
    assert cfg.train.loss_type == "siglip" and cfg.train.precision == "fp16"
    assert cfg.train.optim.betas == [0.9, 0.95] and cfg.train.optim.warmup_steps == 100
    assert cfg.dataset.augmentation.color_jitter == [0.8, 0.32, 0.32, 0.32, 0.08]
    assert cfg.export.opset_version == 17 and cfg.export.encoder_type == "combined"


def test_overrides_follow_hydra_grammar(tao_spec):
    cfg = load_experiment(
        tao_spec,
        [
            "train.num_epochs=3",
            "train.gpu_ids=[0,1]",
            "dataset.train.datasets=[{image_dir: /x}, {image_dir: /y, caption_file_suffix: .caption}]",
            "++train.seed=7",
            "~model.image_size",
            "results_dir=/elsewhere",
        ],
    )
    assert cfg.train.num_epochs == 3
    assert cfg.train.gpu_ids == [0, 1]
    assert [d.image_dir for d in cfg.dataset.train.datasets] == ["/x", "/y"]
    assert cfg.dataset.train.datasets[1].caption_file_suffix == ".caption"
    assert cfg.train.seed == 7
    assert cfg.model.image_size is None  # deleted -> default
    assert cfg.evaluate.checkpoint == "/elsewhere/train/clip_latest.pth"  # interpolation sees the override


def test_plus_adds_a_key_absent_from_the_spec(tmp_path):
    cfg = load_experiment(write_spec(tmp_path / "s.yaml", {"results_dir": "/r"}), ["+model.pretrained_path=/w"])
    assert cfg.model.pretrained_path == "/w"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.num_epoch=3", "unknown key train.num_epoch; did you mean train.num_epochs?"),
        ("train.batch_size=3", "did you mean dataset.train.batch_size"),
        ("train.loss_type=focal", "train.loss_type='focal' (str) is not allowed; choose one of siglip, clip"),
        ("train.num_epochs=ten", "train.num_epochs must be an integer, got 'ten'"),
        ("train.precision=fp8", "choose one of fp16, bf16, fp32"),
        ("model.freeze_text_encoder=maybe", "model.freeze_text_encoder must be true or false"),
        ("train.gpu_ids=0", "train.gpu_ids must be a list"),
        ("+train.num_epochs=2", "already in the spec"),
        ("train.seed=1,2", "sweeps are not supported"),
        ("train.num_epochs=", "train.num_epochs must be an integer"),
    ],
)
def test_bad_overrides_name_the_key(tao_spec, override, message):
    with pytest.raises(ConfigError) as info:
        load_experiment(tao_spec, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_names_its_path(tmp_path):
    path = write_spec(tmp_path / "s.yaml", {"results_dir": "/r", "train": {"optim": {"vison_lr": 1.0}}})
    with pytest.raises(
        ConfigError, match=r"unknown key train\.optim\.vison_lr; did you mean train\.optim\.vision_lr\?"
    ):
        load_experiment(path)


def test_results_dir_is_required(tmp_path):
    with pytest.raises(ConfigError, match="results_dir is required"):
        load_experiment(write_spec(tmp_path / "s.yaml", {"train": {"num_epochs": 1}}))


def test_unreadable_spec_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_experiment(bad)


def test_every_schema_key_is_listed():
    keys = set(all_keys())
    for key in ("train.optim.vision_lr", "dataset.train.wds.samples_per_shard", "gen_trt_engine.tensorrt.data_type"):
        assert key in keys

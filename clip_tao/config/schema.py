"""The experiment spec as typed dataclasses: one dataclass a spec section.

Keys and defaults follow TAO's CLIP task: every key of TAO 7.0.1 and of TAO 7.3 (the keys 7.3 added are marked
"TAO 7.3:"), so a spec of either version loads unchanged. Keys that
clip-tao adds are marked "clip-tao:" in their comment. Validation lives in ``loader.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LossType = Literal["siglip", "clip"]
# TAO 7.3's per-tower adaptation. "legacy" (TAO's own name, from its transitional schema) means "from the 7.2 key
# ``enabled``": true -> lora, false or absent -> frozen. TAO 7.3's final schema has only frozen/full/lora.
TowerMode = Literal["legacy", "frozen", "full", "lora"]
SiglipDistImpl = Literal["bidir", "shift", "reduce", "gather", "local"]
MaskMode = Literal[
    "none",
    "attribute_match_ignore",
    "attribute_plus_accessory_match_ignore",
    "attribute_match_positive",
    "attribute_plus_accessory_match_positive",
]
MetadataMatchMode = Literal["scalar_attributes", "scalar_plus_accessories"]
Precision = Literal["fp16", "bf16", "fp32"]


@dataclass
class WandbConfig:
    # TAO's defaults (CommonExperimentConfig). enable=true without a usable wandb (not installed, not logged
    # in, no WANDB_MODE=offline) logs one warning and goes on with TensorBoard only.
    enable: bool = True
    project: str = "TAO Toolkit"
    entity: str | None = ""
    group: str | None = ""
    tags: list[str] = field(default_factory=lambda: ["training", "tao-toolkit"])
    reinit: bool = False
    sync_tensorboard: bool = False
    save_code: bool = False
    name: str = "TAO Toolkit training experiment"
    run_id: str = ""


@dataclass
class LoraTargetConfig:
    """How one tower adapts under ``peft.enabled`` (``peft.vision`` / ``peft.text``)."""

    # TAO 7.3: frozen | full | lora. The default "legacy" resolves from ``enabled`` (see :meth:`resolved_mode`).
    mode: TowerMode = "legacy"
    # TAO 7.0.1/7.2's switch, still accepted: true = lora, false = frozen; null = not given.
    enabled: bool | None = None
    # Substrings of module names inside a transformer block (SigLIP2: q_proj k_proj v_proj out_proj;
    # RADIO/OpenCLIP fused attention: qkv proj).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    num_last_blocks: int = 3  # 0 = every block
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05

    def resolved_mode(self) -> str:
        """frozen, full or lora: ``mode`` when given, else what the legacy ``enabled`` means."""
        if self.mode != "legacy":
            return self.mode
        return "lora" if self.enabled else "frozen"


@dataclass
class PeftConfig:
    enabled: bool = False
    method: Literal["lora"] = "lora"
    # TAO 7.3: keep logit_scale (and logit_bias) trainable while PEFT is on.
    train_logit_calibration: bool = True
    vision: LoraTargetConfig = field(default_factory=LoraTargetConfig)
    text: LoraTargetConfig = field(default_factory=LoraTargetConfig)


@dataclass
class RegularizationConfig:
    """Geometry-preserving fine-tuning: losses against a frozen copy of the starting model."""

    enabled: bool = False
    embedding_mse_weight: float = 0.05
    cosine_weight: float = 0.05
    similarity_weight: float = 0.10


@dataclass
class ModelConfig:
    type: str = "siglip2-so400m-patch16-256"
    adaptor_name: str | None = None
    freeze_vision_encoder: bool = False
    freeze_text_encoder: bool = False
    # TAO's default is 256 (the default model's size); null means "the model's own size", which is
    # 256 for the default type and the right size for every other type.
    image_size: int | None = None
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    canonicalize_text: bool = False
    # clip-tao: a local weight file or folder used instead of the hub (offline use).
    pretrained_path: str | None = None
    # clip-tao: a local tokenizer folder (Gemma for SigLIP2, BERT for NV-CLIP) instead of the hub.
    tokenizer_path: str | None = None
    # clip-tao, Radio-CLIP: the adaptor teacher's text tower from a local folder/file instead of the hub,
    # and a local clone of NVlabs/RADIO to build the image tower with torch.hub (source='local').
    text_pretrained_path: str | None = None
    radio_repo_dir: str | None = None
    # clip-tao, NaFlex types: an image's patch budget (its aspect ratio is kept); null means 256,
    # the default of the model's own processor. May differ between training and evaluation.
    max_num_patches: int | None = None


@dataclass
class DatasetEntry:
    image_dir: str = ""
    caption_dir: str | None = None
    caption_file_suffix: str = ".txt"
    image_list_file: str | None = None
    # clip-tao: every non-empty line of a caption file is a caption of its image (COCO/Flickr style).
    multi_caption: bool = False
    # clip-tao: hard negatives, one a line, in files at the caption's relative path and suffix (null: none).
    negative_caption_dir: str | None = None
    # TAO 7.3: TAO's PAS metadata (``*_pairs.json``, joined to image_list_file by row). train_pairs_file feeds
    # training (balanced sampling, metadata masks); attribute_pairs_file validation and evaluate (null: the
    # ``<x>_pairs.json`` beside an ``<x>_list.txt``).
    train_pairs_file: str | None = None
    attribute_pairs_file: str | None = None


@dataclass
class WdsConfig:
    root_dir: str | None = None
    shard_list_file: str | None = None
    # Used for the epoch length unless sizes.json / _info.json / img2dataset *_stats.json give real counts.
    samples_per_shard: int = 10000
    # Training: the sample streams the shards are dealt to (null: the largest divisor of the global batch up to
    # the shard count and 128). The sample order depends on it, never on the processes or loader workers.
    streams: int | None = None


@dataclass
class TrainDataConfig:
    type: Literal["custom", "wds"] = "custom"
    batch_size: int = 16
    num_workers: int = 8
    datasets: list[DatasetEntry] = field(default_factory=list)
    wds: WdsConfig = field(default_factory=WdsConfig)
    # TAO 7.3: batches balanced over the pairs files' query_type; with unique_caption_per_batch, one row per
    # caption a batch; include_attribute_metadata puts the attribute tensors in the batches (mask modes).
    balance_query_types: bool = False
    unique_caption_per_batch: bool = True
    include_attribute_metadata: bool = False


@dataclass
class ValDataConfig:
    # clip-tao: validation (and evaluate's fallback) data may be WebDataset shards too.
    type: Literal["custom", "wds"] = "custom"
    datasets: list[DatasetEntry] = field(default_factory=list)
    batch_size: int = 16
    num_workers: int = 8
    wds: WdsConfig = field(default_factory=WdsConfig)
    # TAO 7.3: text->image positives defined by the attribute metadata (val/pas/* KPIs).
    metadata_match_eval: bool = False
    metadata_match_mode: MetadataMatchMode = "scalar_attributes"


@dataclass
class AugmentationConfig:
    scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    # [probability, brightness, contrast, saturation, hue]
    color_jitter: list[float] = field(default_factory=lambda: [0.8, 0.32, 0.32, 0.32, 0.08])
    grayscale: float = 0.2


@dataclass
class DatasetConfig:
    seed: int = 42
    pin_memory: bool = True
    train: TrainDataConfig = field(default_factory=TrainDataConfig)
    val: ValDataConfig = field(default_factory=ValDataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)


@dataclass
class CudnnConfig:
    benchmark: bool = False
    deterministic: bool = True


@dataclass
class OptimConfig:
    optimizer_type: Literal["adamw", "lamb"] = "adamw"
    vision_lr: float = 1e-4
    text_lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-6
    warmup_steps: int = 100
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class CheckpointerConfig:
    """TAO 7.3's ``train.checkpointer``: keep the best checkpoints by a monitored KPI, beside the periodic ones."""

    enable_topk: bool = False
    replace_periodic: bool = False  # keep only the best file(s), no periodic series
    monitor: str | None = None  # any logged KPI (val/t2i_mAP, val/pas/overall_mAP ...); null: see README
    mode: Literal["min", "max"] | None = None
    save_top_k: int = 1
    filename: str = "model_best_{epoch:03d}"  # format fields: epoch, step and the KPIs (val/x as val_x)
    dirpath: str | None = None  # null: the train results folder
    auto_insert_metric_name: bool = False


@dataclass
class TrainConfig:
    num_gpus: int = 1
    gpu_ids: list[int] = field(default_factory=lambda: [0])
    num_nodes: int = 1
    seed: int = 1234
    cudnn: CudnnConfig = field(default_factory=CudnnConfig)
    num_epochs: int = 10
    checkpoint_interval: int = 1
    checkpoint_interval_unit: Literal["epoch", "step"] = "epoch"
    # clip-tao: SIGTERM (a preemption, scancel --signal=TERM) first finishes the step and writes its checkpoint,
    # then stops; null: under Slurm (SLURM_JOB_ID set). Otherwise SIGTERM stops at once, like Ctrl-C.
    checkpoint_on_sigterm: bool | None = None
    validation_interval: int = 1
    val_check_interval: float | None = None
    resume_training_checkpoint_path: str | None = None
    pretrained_model_path: str | None = None
    loss_type: LossType = "siglip"
    # TAO 7.3: how SigLIP's negatives cross ranks (open_clip's strategies; local = none).
    siglip_loss_dist_impl: SiglipDistImpl = "gather"
    # TAO 7.3: metadata masks of the SigLIP loss, and the weight of pairs they promote to positives.
    siglip_loss_mask_mode: MaskMode = "none"
    compatible_positive_weight: float = 1.0
    compatible_positive_normalization: Literal["per_pair", "per_query"] = "per_query"
    # TAO 7.3: auxiliary batch-hard triplet loss (0 = off).
    triplet_loss_weight: float = 0.0
    triplet_margin: float = 0.2
    precision: Precision = "fp16"
    grad_clip_norm: float | None = None
    grad_checkpointing: bool = False
    distributed_strategy: Literal["ddp", "fsdp"] = "ddp"
    # clip-tao: micro-batches per optimiser step; contrastive negatives span all of them (features cached).
    accumulate_grad_batches: int = 1
    # clip-tao: append "<step> <sample key>" for every trained sample to this file (audits data order/resumption).
    sample_log: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpointer: CheckpointerConfig = field(default_factory=CheckpointerConfig)
    # TAO's common task key: overrides results_dir/train.
    results_dir: str | None = None
    # clip-tao: continue from results_dir/train/clip_latest.pth (FSDP: clip_latest.dcp) when it exists.
    auto_resume: bool = True
    # clip-tao: compute threads of the main process (default: OMP_NUM_THREADS, else the allowed CPUs less one
    # a loader worker); loader workers always run one.
    num_threads: int | None = None
    # clip-tao: torch.compile the model for training.
    compile: bool = False
    # clip-tao: hard-negative captions a sample (negative_caption_dir / neg.txt), drawn from its seed.
    hard_negatives_per_sample: int = 1
    # clip-tao: off-diagonal pairs with the anchor's caption text or a byte-identical image: negative
    # (open_clip's), ignore (left out of the loss) or positive (multi-positive).
    duplicate_pairs: Literal["negative", "ignore", "positive"] = "negative"


@dataclass
class EvaluateConfig:
    checkpoint: str | None = None
    trt_engine: str | None = None
    # clip-tao: run from exported ONNX file(s) with ONNX Runtime instead of PyTorch.
    onnx_file: str | None = None
    datasets: list[DatasetEntry] = field(default_factory=list)
    batch_size: int = 16
    num_workers: int = 8
    num_gpus: int = 1
    gpu_ids: list[int] = field(default_factory=lambda: [0])
    results_dir: str | None = None
    # TAO 7.0.1 shares one dataclass between evaluate and inference, so evaluate has it too; unused here.
    text_file: str | None = None
    # TAO 7.3: ground truth of direct PAS evaluation (evaluate.datasets with pairs files).
    pas_ground_truth_mode: Literal["paired_caption", "scalar_attributes", "scalar_plus_accessories"] = "paired_caption"
    # clip-tao: "retrieval" (TAO's) or zero-shot "classification" of a folder-per-class image tree.
    # clip-tao: or "pairs": compositional accuracy on pairs_file (JSON lines: image, positive, negatives, tag).
    mode: Literal["retrieval", "classification", "pairs"] = "retrieval"
    classnames_file: str | None = None  # one class name a line, in sorted folder order
    templates_file: str | None = None  # prompt templates, one a line, "{}" marks the class name
    # clip-tao, at scale: WebDataset shards (local or s3://, keys as in dataset.train.wds) instead of datasets.
    wds: WdsConfig = field(default_factory=WdsConfig)
    pairs_file: str | None = None  # clip-tao: for mode=pairs


@dataclass
class MineConfig:
    """clip-tao: ``inference.mode: mine``, hard negatives for training from the current model."""

    negatives_per_image: int = 3
    max_similarity: float | None = None  # cosine; candidates above it are skipped as likely true captions
    output_dir: str | None = None  # null: <inference results>/negatives (the negative_caption_dir layout)


@dataclass
class InferenceConfig:
    checkpoint: str | None = None
    trt_engine: str | None = None
    # clip-tao: run from exported ONNX file(s) with ONNX Runtime instead of PyTorch.
    onnx_file: str | None = None
    datasets: list[DatasetEntry] = field(default_factory=list)
    text_file: str | None = None
    batch_size: int = 16
    num_workers: int = 8
    num_gpus: int = 1
    gpu_ids: list[int] = field(default_factory=lambda: [0])
    results_dir: str | None = None
    # clip-tao: "embed" (TAO's .h5 files), "search": rank the images against each prompt / query image,
    # "mine": write hard negatives of every image of inference.datasets (see mine), or "dedup": groups of
    # near-duplicate images (see dedup_threshold).
    mode: Literal["embed", "search", "mine", "dedup"] = "embed"
    top_k: int = 5
    image_embeddings_file: str | None = None  # search an existing image_embeddings.h5 instead of embedding
    query_images: list[str] = field(default_factory=list)  # image files or folders for image-to-image search
    faiss_min_images: int = 50000  # collections at least this large are searched through a FAISS index
    # clip-tao, at scale: WebDataset shards (local or s3://, keys as in dataset.train.wds) instead of datasets;
    # captions are not needed.
    wds: WdsConfig = field(default_factory=WdsConfig)
    # clip-tao, at scale: "h5" (TAO's image_embeddings.h5) or "npy": clip-retrieval's img_emb/ + metadata/
    # folders as well (what autofaiss and clip-retrieval read).
    output_format: Literal["h5", "npy"] = "h5"
    # clip-tao, at scale: images a part (the unit written, resumed and shared out between processes) for
    # image folders; null: a 64th of the collection, 10,000 at most. Shards: one part a shard.
    part_size: int | None = None
    mine: MineConfig = field(default_factory=MineConfig)
    # An index built by clip-tao index (its index.faiss): search and dedup go through it instead.
    index_file: str | None = None
    dedup_threshold: float = 0.95  # mode=dedup: images at least this cosine-similar to a group's first join it


@dataclass
class ExportConfig:
    checkpoint: str | None = None
    onnx_file: str | None = None
    encoder_type: Literal["combined", "separate"] = "combined"
    opset_version: int = 17
    batch_size: int = -1
    # TAO's default is 256; null means the model's own image size.
    input_height: int | None = None
    input_width: int | None = None
    input_channel: int = 3
    gpu_id: int = 0
    on_cpu: bool = False
    verbose: bool = False
    results_dir: str | None = None
    # clip-tao: replace existing files (export refuses to overwrite by default, as TAO does).
    overwrite: bool = False
    # clip-tao: also write a Triton model repository (config.pbtxt + 1/model.onnx) into this folder.
    triton_repository: str | None = None
    # clip-tao: fp16 writes a mixed-precision graph (fp16 weights/activations; LayerNorm, Softmax, reductions
    # and the final L2 normalisation in fp32), the input of TensorRT 11's strongly typed fp16 builds.
    data_type: Literal["fp32", "fp16"] = "fp32"


@dataclass
class TensorRTConfig:
    data_type: Literal["fp16", "fp32"] = "fp32"
    workspace_size: int = 1024
    min_batch_size: int = 1
    opt_batch_size: int = 1
    max_batch_size: int = 16
    layers_precision: list[str] = field(default_factory=list)


@dataclass
class GenTrtEngineConfig:
    onnx_file: str | None = None
    trt_engine: str | None = None
    batch_size: int = -1
    gpu_id: int = 0
    timing_cache: str | None = None
    verbose: bool = False
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)
    results_dir: str | None = None


@dataclass
class DeployInfo:
    """clip-tao: written by export into ``X_config.yaml`` so deployed files need nothing else."""

    model_type: str | None = None
    encoder_type: str | None = None
    embed_dim: int | None = None
    image_size: int | None = None
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    interpolation: str | None = None
    resize_mode: str | None = None
    context_length: int | None = None
    logit_scale: float | None = None  # already exponentiated, as the ONNX output
    logit_bias: float | None = None
    opset_version: int | None = None
    data_type: str = "fp32"  # export.data_type of the files
    # NaFlex exports: the patch size and budget the runtime pre-processes with.
    patch_size: int | None = None
    max_num_patches: int | None = None


@dataclass
class ServeConfig:
    """clip-tao: ``clip-tao serve``, an embedding and search service speaking Triton's HTTP protocol."""

    # The backend, as in evaluate/inference: trt_engine, onnx_file, else checkpoint (null: the type's weights).
    checkpoint: str | None = None
    onnx_file: str | None = None
    trt_engine: str | None = None
    num_gpus: int = 1
    gpu_ids: list[int] = field(default_factory=lambda: [0])
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines (in a container, for example)
    port: int = 8000
    # Dynamic batching: requests are gathered until max_batch_size items or max_queue_delay_ms have passed.
    # Also the max batch size and queue delay of the Triton repository that export writes.
    dynamic_batching: bool = True
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_request_mb: float = 16.0  # larger request bodies get 413
    # /search: the collection (TAO's image_embeddings.h5) loaded at start; FAISS from faiss_min_images on.
    image_embeddings_file: str | None = None
    faiss_min_images: int = 50000
    index_file: str | None = None  # an index built by clip-tao index over image_embeddings_file
    max_top_k: int = 100
    graceful_shutdown_s: float = 30.0  # SIGTERM: finish in-flight requests for at most this long
    # OpenAI /v1/embeddings: the model id clients name (null: model.type), e.g. nvidia/nvclip for NV-CLIP clients.
    served_model_name: str | None = None


@dataclass
class IndexConfig:
    """clip-tao: ``clip-tao index``, an approximate FAISS index of an embeddings file of any size."""

    embeddings_file: str | None = None  # image_embeddings.h5, or a folder of .npy parts (clip-retrieval's img_emb/)
    max_memory: str = "4G"  # the index's memory budget: bytes, or a size such as 512M, 4G, 64G
    exact_max_vectors: int = 100000  # up to this many vectors: exact (flat) search, if it fits max_memory
    index_key: str | None = None  # a faiss index_factory string instead of the automatic choice
    target_recall: float = 0.95  # the search setting (nprobe, efSearch) is the cheapest reaching this recall@10
    rerank_factor: int = 0  # re-score k x this many candidates exactly from the file; 0: 8 for IVF-PQ, else 1
    num_queries: int = 1000  # held-out queries that measure recall against exact search
    chunk_size: int = 65536  # vectors read and added at a time
    seed: int = 0
    results_dir: str | None = None


@dataclass
class ExperimentConfig:
    # Required; ``None`` here only so the dataclass can be built with defaults.
    results_dir: str | None = None
    encryption_key: str | None = None  # TAO legacy: accepted and ignored
    model_name: str = "clip"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gen_trt_engine: GenTrtEngineConfig = field(default_factory=GenTrtEngineConfig)
    deploy: DeployInfo = field(default_factory=DeployInfo)
    serve: ServeConfig = field(default_factory=ServeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def task_dir(self, task: str) -> str:
        """``results_dir/<task>``, or the task section's own ``results_dir`` when set (TAO's rule)."""
        import os

        section = getattr(self, task, None)
        own = getattr(section, "results_dir", None)
        return own or os.path.join(self.results_dir, task)

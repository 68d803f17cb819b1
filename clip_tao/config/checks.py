"""Rules across spec keys: ``peft`` and ``regularization`` ranges (TAO's ``valid_min``/``valid_max``), the
per-tower ``mode``/``enabled`` agreement, and what TAO 7.3's loss keys need of each other."""

from __future__ import annotations

from clip_tao.config.schema import ExperimentConfig
from clip_tao.errors import ConfigError

# What the legacy per-tower ``enabled`` means as a TAO 7.3 ``mode``.
LEGACY_MODE = {True: "lora", False: "frozen"}
POSITIVE_MODES = ("attribute_match_positive", "attribute_plus_accessory_match_positive")


def check_peft_and_regularization(cfg: ExperimentConfig) -> None:
    for tower in ("vision", "text"):
        lora = getattr(cfg.peft, tower)
        key = f"peft.{tower}"
        for name in ("rank", "alpha"):
            if getattr(lora, name) < 1:
                raise ConfigError(f"{key}.{name}={getattr(lora, name)} must be >= 1")
        if lora.num_last_blocks < 0:
            raise ConfigError(f"{key}.num_last_blocks={lora.num_last_blocks} must be >= 0 (0 = every block)")
        if not 0.0 <= lora.dropout <= 1.0:
            raise ConfigError(f"{key}.dropout={lora.dropout} must be in [0, 1]")
        if lora.enabled is not None and lora.mode != "legacy" and lora.mode != LEGACY_MODE[lora.enabled]:
            flag = "true" if lora.enabled else "false"
            raise ConfigError(
                f"{key}.enabled={flag} (which means mode {LEGACY_MODE[lora.enabled]}) contradicts "
                f"{key}.mode={lora.mode}: remove {key}.enabled, TAO 7.3 uses mode alone"
            )
        if lora.resolved_mode() == "lora" and not lora.target_modules:
            raise ConfigError(f"{key}.target_modules is empty: name module leaf names such as q_proj, v_proj")
    if cfg.peft.enabled and cfg.train.distributed_strategy == "fsdp":
        raise ConfigError(
            "peft.enabled=true with train.distributed_strategy=fsdp is not supported: use ddp (only the adapters "
            "train, so DDP holds no optimiser state for the frozen weights)"
        )
    r = cfg.regularization
    for name in ("embedding_mse_weight", "cosine_weight", "similarity_weight"):
        if getattr(r, name) < 0:
            raise ConfigError(f"regularization.{name}={getattr(r, name)} must be >= 0")


def check_loss_keys(cfg: ExperimentConfig) -> None:
    """TAO 7.3's preconditions of the metadata-masked SigLIP loss (checked when training starts)."""
    t, data = cfg.train, cfg.dataset.train
    mode = t.siglip_loss_mask_mode
    if t.loss_type != "siglip" or mode == "none":
        return
    if not data.include_attribute_metadata:
        raise ConfigError(
            f"train.siglip_loss_mask_mode={mode} needs the attribute metadata in the batches: "
            "set dataset.train.include_attribute_metadata=true (and a train_pairs_file per dataset)"
        )
    if data.type != "custom":
        raise ConfigError(f"train.siglip_loss_mask_mode={mode} needs dataset.train.type=custom (TAO's pairs files)")
    if t.siglip_loss_dist_impl not in ("local", "gather"):
        raise ConfigError(
            f"train.siglip_loss_mask_mode={mode} works with train.siglip_loss_dist_impl local or gather, "
            f"not {t.siglip_loss_dist_impl}"
        )
    if mode in POSITIVE_MODES:
        if len(data.datasets) != 1:
            raise ConfigError(
                f"train.siglip_loss_mask_mode={mode} needs exactly one dataset in dataset.train.datasets "
                f"(promoted pairs must not mix datasets), got {len(data.datasets)}"
            )
        if t.triplet_loss_weight > 0:
            raise ConfigError(
                f"train.triplet_loss_weight={t.triplet_loss_weight} with train.siglip_loss_mask_mode={mode}: the "
                "triplet loss would mine the promoted positives as negatives; set one of them off"
            )

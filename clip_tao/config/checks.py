"""Value ranges of the ``peft`` and ``regularization`` sections (TAO's ``valid_min``/``valid_max``)."""

from __future__ import annotations

from clip_tao.config.schema import ExperimentConfig
from clip_tao.errors import ConfigError


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
        if lora.enabled and not lora.target_modules:
            raise ConfigError(f"{key}.target_modules is empty: name module substrings such as q_proj, v_proj")
    if cfg.peft.enabled and cfg.train.distributed_strategy == "fsdp":
        raise ConfigError(
            "peft.enabled=true with train.distributed_strategy=fsdp is not supported: use ddp (only the adapters "
            "train, so DDP holds no optimiser state for the frozen weights)"
        )
    r = cfg.regularization
    for name in ("embedding_mse_weight", "cosine_weight", "similarity_weight"):
        if getattr(r, name) < 0:
            raise ConfigError(f"regularization.{name}={getattr(r, name)} must be >= 0")

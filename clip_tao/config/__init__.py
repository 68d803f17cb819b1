"""Typed experiment config and its loader."""

from clip_tao.config.loader import all_keys, build_config, config_to_dict, load_experiment
from clip_tao.config.schema import DatasetEntry, ExperimentConfig

__all__ = ["DatasetEntry", "ExperimentConfig", "all_keys", "build_config", "config_to_dict", "load_experiment"]

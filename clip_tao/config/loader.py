"""Spec file + Hydra-style overrides -> a validated, typed :class:`ExperimentConfig`.

The spec may be YAML (TAO Launcher) or JSON (TAO's remote client). Overrides use Hydra's grammar
(``a.b=1``, ``a.b=[1,2]``, ``+a.b=1``, ``++a.b=1``, ``~a.b``) and ``${...}`` interpolations are
resolved, as in TAO. Every problem becomes one :class:`ConfigError` line that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clip_tao.config.checks import check_peft_and_regularization
from clip_tao.config.ranges import check_ranges
from clip_tao.config.schema import ExperimentConfig
from clip_tao.config.secrets import protect, written_expressions
from clip_tao.config.spec_limits import MAX_SPEC_BYTES, check_spec_size
from clip_tao.errors import ConfigError


def load_experiment(spec_path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read ``spec_path``, apply ``overrides`` and return the validated config."""
    merged = merge_overrides(read_spec_file(spec_path), overrides)
    cfg = build_config(_resolve(merged), source=str(spec_path))
    # What we write keeps the expressions that read secrets (the environment), never their values.
    cfg.written_expressions = written_expressions(OmegaConf.to_container(merged, resolve=False))
    return cfg


def read_spec_file(spec_path: str | os.PathLike) -> dict:
    path = os.fspath(spec_path)
    if not os.path.isfile(path):
        raise ConfigError(f"spec file {path!r} does not exist: pass an existing YAML or JSON file with -e")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_SPEC_BYTES + 1)
        check_spec_size(path, text)
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            # OmegaConf's YAML loader reads 1e-4 as a float (plain PyYAML reads it as a string).
            data = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except (json.JSONDecodeError, yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"spec file {path!r} cannot be parsed: {detail}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"spec file {path!r} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply Hydra-grammar overrides to the raw spec and resolve ``${...}`` interpolations."""
    return _resolve(merge_overrides(raw, overrides))


def merge_overrides(raw: dict, overrides: Sequence[str]):
    """The raw spec with Hydra-grammar overrides applied, interpolations not yet resolved (a DictConfig)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    cfg = OmegaConf.create(raw)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(f"bad override: {' '.join(str(exc).split())}") from exc
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(f"override {override.input_line!r}: sweeps are not supported, give one value")
        present = OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING
        if override.type == OverrideType.DEL:
            if not present:
                raise ConfigError(f"override {override.input_line!r}: key {key!r} is not in the spec")
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            del node[leaf]
            continue
        if override.type == OverrideType.ADD and present:
            raise ConfigError(
                f"override {override.input_line!r}: {key} is already in the spec; "
                f"use {key}=... to change it or ++{key}=... to force"
            )
        OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)
    return cfg


def _resolve(cfg) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"spec interpolation failed: {' '.join(str(exc).split())}") from exc


_MISSING = object()


def build_config(raw: dict, source: str = "spec") -> ExperimentConfig:
    """Validate a plain dict against the schema and build the dataclasses."""
    cfg = _build_dataclass(ExperimentConfig, raw, path="")
    check_peft_and_regularization(cfg)
    check_ranges(cfg)
    if not cfg.results_dir:
        raise ConfigError(f"{source}: results_dir is required: set it in the spec or pass results_dir=/path")
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data for the files we write (experiment.yaml, checkpoints, export configs).

    Values that came from a resolver (``${oc.env:...}``) are written as their expression, and keys named like
    secrets are masked, so no secret reaches a file.
    """
    return protect(dataclasses.asdict(cfg), getattr(cfg, "written_expressions", {}))


def all_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (``train.optim.vision_lr`` ...)."""
    keys = []
    for name, hint in get_type_hints(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        inner = _dataclass_in(hint)
        if inner is not None:
            keys.extend(all_keys(inner, dotted + "."))
    return keys


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds, directly or as list items."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def _suggest(path: str, key: str, valid: list[str]) -> str:
    """Nearest valid key at the same level, else the same leaf name elsewhere in the schema."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {path}{close[0]}?"
    elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean {' or '.join(elsewhere[:3])}?"
    return f"; valid keys here: {', '.join(valid)}"


def _build_dataclass(cls: type, data: Any, path: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        where = path.rstrip(".") or "the spec"
        raise ConfigError(f"{where} must be a mapping of keys, got {_show(data)}")
    hints = get_type_hints(cls)
    prefix = path
    for key in data:
        if key not in hints:
            raise ConfigError(f"unknown key {prefix}{key}{_suggest(prefix, str(key), list(hints))}")
    values = {key: _convert(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, key + ".")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}={_show(value)} is not allowed; choose one of {', '.join(choices)}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (item,) = get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_show(value)}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {_show(value)}")
    if hint is float:
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value)
        except OverflowError:  # a 400-digit integer
            raise ConfigError(f"{key} has {len(str(value))} digits: too large for a number") from None
        except ValueError:
            pass
        raise ConfigError(f"{key} must be a number, got {_show(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {_show(value)}")
    raise TypeError(f"schema type {hint!r} of {key} is not handled")  # a bug in the schema, not user input


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}"
    return f"{value!r} ({type(value).__name__})"

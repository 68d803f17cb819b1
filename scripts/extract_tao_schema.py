"""Write TAO's CLIP spec schema (every key with its default and type) from a TAO source checkout.

Runs TAO's own config dataclasses, so the key list is TAO's, not a transcription. TAO 7.0.1::

    git clone -b 7.0.1 https://github.com/NVIDIA-TAO/tao-pytorch /tmp/tao-pytorch
    python scripts/extract_tao_schema.py /tmp/tao-pytorch > tests/data/tao_7.0.1_clip_schema.json

TAO 7.3 (its config lives in the package ``nvidia_tao_core``; no git tag holds it)::

    python scripts/extract_tao_schema.py --package nvidia_tao_core /tmp/tao73 > tests/data/tao_7.3_clip_schema.json

where ``/tmp/tao73/nvidia_tao_core/config/`` holds ``clip/default_config.py`` from NVIDIA/tao_front_end_services
at commit bd9a0ee56ad9c0d6b6bb741ba84c2c57a20cfc31 (32,877 characters) and ``common/common_config.py`` from
NVIDIA-TAO/tao-core at commit ec99e12fb1d9cc68427d21f38cd222ceda9036df (16,512 characters: 7.0.1's file plus
``CheckpointerConfig``). That commit's ``utils/types.py`` and ``common/mlops.py`` are not published; the 7.0.1
tag's files of the same name are used with the package name changed (they hold the field helpers and
``WandBConfig``, which carry no CLIP key of their own).

Only four files are executed (``config/utils/types.py``, ``config/common/mlops.py``,
``config/common/common_config.py``, ``config/clip/default_config.py``); they need nothing but
``dataclasses`` and ``omegaconf``, so TAO itself need not be installed. The output holds
``default_spec`` (all defaults as the JSON a remote client sends; TAO's required ``???`` values as null),
``keys`` (dotted key -> TAO's type annotation), ``valid_options`` and ``valid_ranges`` (the choices and bounds
TAO's fields declare) and, where the checkout has it, ``nvclip_model_configs`` (TAO's open_clip architectures
of the NV-CLIP types, from ``multimodal/clip/utils/model_configs.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import types
import typing

from omegaconf import OmegaConf

MODULES = (
    "config.utils.types",
    "config.common.mlops",
    "config.common.common_config",
    "config.clip.default_config",
)


def load_tao_config(root: str, package: str = "nvidia_tao_pytorch"):
    """Import TAO's config modules from ``root`` without importing the rest of its package."""
    names = [f"{package}.{module}" for module in MODULES]
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            pkg = ".".join(parts[:i])
            if pkg not in sys.modules:
                module = types.ModuleType(pkg)
                module.__path__ = []
                sys.modules[pkg] = module
        path = os.path.join(root, *parts) + ".py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[names[-1]].CLIPExperimentConfig


def key_types(cls, prefix: str = "") -> dict[str, str]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        dotted = prefix + f.name
        out[dotted] = _type_name(hint)
        inner = _dataclass_in(hint)
        if inner is not None:
            out.update(key_types(inner, dotted + ("[]." if _is_list(hint) else ".")))
    return out


def field_rules(cls, prefix: str = "") -> tuple[dict, dict]:
    """``valid_options`` and ``valid_min``/``valid_max`` that TAO's field helpers record in the metadata."""
    options, ranges = {}, {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        meta = dict(f.metadata)
        if meta.get("valid_options"):
            options[dotted] = [o.strip() for o in str(meta["valid_options"]).split(",")]
        low, high = (None if meta.get(k) in (None, "") else meta[k] for k in ("valid_min", "valid_max"))
        if low is not None or high is not None:
            ranges[dotted] = [low, high]
        inner = _dataclass_in(hints[f.name])
        if inner is not None:
            sub_options, sub_ranges = field_rules(inner, dotted + ("[]." if _is_list(hints[f.name]) else "."))
            options.update(sub_options)
            ranges.update(sub_ranges)
    return options, ranges


def _is_list(hint) -> bool:
    return typing.get_origin(hint) in (list, typing.List)  # noqa: UP006 (TAO's annotations)


def _dataclass_in(hint):
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def _type_name(hint) -> str:
    if dataclasses.is_dataclass(hint):
        return "section"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return f"optional[{names[0]}]" if len(names) == 1 else "|".join(names)
    if _is_list(hint):
        return f"list[{_type_name(args[0])}]" if args else "list"
    return getattr(hint, "__name__", str(hint))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tao_root", help="the folder holding the package (nvidia_tao_pytorch/ or nvidia_tao_core/)")
    parser.add_argument(
        "--package",
        default="nvidia_tao_pytorch",
        choices=["nvidia_tao_pytorch", "nvidia_tao_core"],
        help="TAO 7.0.1 keeps its config in nvidia_tao_pytorch, later versions in nvidia_tao_core",
    )
    args = parser.parse_args()
    cls = load_tao_config(args.tao_root, args.package)
    cfg = OmegaConf.structured(cls)
    spec = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    spec = _missing_to_null(spec)
    out = {"default_spec": spec, "keys": key_types(cls)}
    if args.package != "nvidia_tao_pytorch":
        out["valid_options"], out["valid_ranges"] = field_rules(cls)
    configs = nvclip_configs(args.tao_root)
    if configs is not None:
        out["nvclip_model_configs"] = configs
    json.dump(out, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


def nvclip_configs(root: str) -> dict | None:
    """TAO's open_clip architectures for NV-CLIP (``map_clip_model_cfg``): plain data, no imports."""
    path = os.path.join(root, "nvidia_tao_pytorch", "multimodal", "clip", "utils", "model_configs.py")
    if not os.path.isfile(path):
        return None
    namespace: dict = {}
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), namespace)  # noqa: S102 (TAO's own data file)
    return namespace["map_clip_model_cfg"]


def _missing_to_null(value):
    if isinstance(value, dict):
        return {k: _missing_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_missing_to_null(v) for v in value]
    return None if value == "???" else value


if __name__ == "__main__":
    main()

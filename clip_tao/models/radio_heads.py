"""RADIO's adaptor MLP heads (what timm does not ship): teacher summary token -> teacher embedding.

Parameter names are RADIO's (``radio/adaptor_mlp.py``), so a head's tensors load unchanged:

- v1 ``MLP``: ``fc1`` -> LayerNorm ``norm`` -> ReLU -> ``inner`` ((Linear, LayerNorm, ReLU) x n) -> ``fc2``.
- v2 ``MLP2``: optional ``pre_norm`` (LayerNorm, GELU) -> ``fc1`` -> residual ``blocks`` (LayerNorm, GELU,
  Linear) -> ``final`` (LayerNorm, GELU, Linear).

The version, widths and depth of a stored head are read from its tensors (:func:`head_from_state`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from clip_tao.errors import ModelError


class MlpHeadV1(nn.Module):
    """RADIO's "v1" adaptor MLP."""

    version = "v1"

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_inner: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.relu = nn.ReLU()
        inner: list[nn.Module] = []
        for _ in range(num_inner):
            inner += [nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU()]
        self.inner = nn.Sequential(*inner) if inner else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    @property
    def output_dim(self) -> int:
        return self.fc2.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.inner(self.relu(self.norm(self.fc1(x)))))

    @staticmethod
    def shape_from_state(state: Mapping[str, torch.Tensor]) -> dict:
        hidden_dim, input_dim = state["fc1.weight"].shape
        num_inner = 0
        while f"inner.{3 * num_inner}.weight" in state:
            num_inner += 1
        return {
            "input_dim": input_dim,
            "hidden_dim": hidden_dim,
            "output_dim": state["fc2.weight"].shape[0],
            "num_inner": num_inner,
        }


class MlpHeadV2(nn.Module):
    """RADIO's "v2" adaptor MLP."""

    version = "v2"

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_inner: int = 0, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = nn.Sequential(nn.LayerNorm(input_dim), nn.GELU()) if pre_norm else nn.Identity()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
            for _ in range(num_inner)
        )
        self.final = nn.Sequential(nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))

    @property
    def output_dim(self) -> int:
        return self.final[2].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.pre_norm(x))
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)

    @staticmethod
    def shape_from_state(state: Mapping[str, torch.Tensor]) -> dict:
        hidden_dim, input_dim = state["fc1.weight"].shape
        num_inner = 0
        while f"blocks.{num_inner}.0.weight" in state:
            num_inner += 1
        return {
            "input_dim": input_dim,
            "hidden_dim": hidden_dim,
            "output_dim": state["final.2.weight"].shape[0],
            "num_inner": num_inner,
            "pre_norm": "pre_norm.0.weight" in state,
        }


HEAD_VERSIONS = {"v1": MlpHeadV1, "v2": MlpHeadV2}


def head_version(state: Mapping[str, torch.Tensor], where: str) -> str:
    """``v1`` or ``v2`` from the tensor names; one clear error for anything else."""
    if any(".parametrizations." in k for k in state):
        raise ModelError(
            f"{where} is stored spectrally reparametrised (no EMA weights in the file): export the "
            "checkpoint's state_dict_ema, or load it with model.radio_repo_dir"
        )
    if "fc1.weight" in state and "final.2.weight" in state:
        return "v2"
    if "fc1.weight" in state and "fc2.weight" in state:
        return "v1"
    raise ModelError(
        f"{where} fits no RADIO MLP version (v1 needs fc1/fc2, v2 fc1/final.2; found {sorted(state)[:4]}): "
        "the file is not a RADIO adaptor head"
    )


def head_from_state(state: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """A head built to the stored tensors' version and shapes, with those tensors loaded strictly (as float32)."""
    head_class = HEAD_VERSIONS[head_version(state, where)]
    try:
        head = head_class(**head_class.shape_from_state(state))
    except KeyError as exc:
        raise ModelError(
            f"{where} lacks {exc} of a RADIO MLP {head_class.version} head: the file is incomplete"
        ) from exc
    wanted = head.state_dict()
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    if missing or extra:
        raise ModelError(
            f"{where} does not fit a RADIO MLP {head_class.version} head: missing {missing[:3]}, unexpected "
            f"{extra[:3]}: the file is incomplete or not a RADIO checkpoint"
        )
    bad = [k for k, v in wanted.items() if v.shape != state[k].shape]
    if bad:
        raise ModelError(
            f"{where}: head tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, not {tuple(wanted[bad[0]].shape)}"
        )
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head


def head_from_config(version: str, shape: Mapping[str, int]) -> nn.Module:
    """A randomly initialised head of ``version`` (``v1``/``v2``) and ``shape`` (input/hidden/output dims, depth)."""
    if version not in HEAD_VERSIONS:
        raise ModelError(f"RADIO MLP version {version!r} is not supported: use v1 or v2")
    return HEAD_VERSIONS[version](**shape)

"""The structural groups a network is pruned by: each group is a set of units (channels, heads) and,
for every unit, the coupled slices of all the weights that a removal cuts (Torch-Pruning's dependency
groups, written down per architecture).

resnet  `inner` (one group per block): conv1 output channels; cut conv1 rows, bn1, conv2 columns.
        `widths` (one group per stage): the residual-stream channels; cut every writer (the stem or the
        stage's projection, each block's conv2 rows, their BatchNorms) and every reader (conv1 and
        projection input columns, the classifier's columns).
vit     `layer_heads` (one group per layer): whole heads; cut q/k/v rows (+ biases, head_dim entries
        each) and o_proj columns. `layer_mlp` (one group per layer): fc1 rows (+ bias), fc2 columns.
        The residual stream (hidden size) is never cut.

A unit's norm is the L2 norm of its *scored* entries. Conv weights that feed a BatchNorm are not scored:
BN normalises each channel, so their scale is free and would let a rewrite fake a small norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tyrsearch.meta.nets import NetConfig, ResNetConfig, ViTNetConfig

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Slice:
    name: str  # state-dict entry
    dim: int  # dimension along which the units lie
    scored: bool = True  # counts in the unit's norm


@dataclass(frozen=True)
class Group:
    field: str  # the config's width tuple this group sets ...
    index: int  # ... and its entry
    size: int  # units
    unit: int  # entries per unit along each slice's dim (head_dim for heads, 1 for channels)
    slices: tuple[Slice, ...]

    @property
    def name(self) -> str:
        return f"{self.field}.{self.index}"


def _bn(prefix: str) -> list[Slice]:
    return [Slice(f"{prefix}.{f}", 0, scored=f in ("weight", "bias")) for f in BN_FIELDS]


def _resnet_groups(config: ResNetConfig) -> list[Group]:
    groups = []
    for b in range(config.num_blocks):
        block = f"blocks.{b}"
        groups.append(Group("inner", b, config.inner[b], 1, (
            Slice(f"{block}.conv1.weight", 0, scored=False), *_bn(f"{block}.bn1"), Slice(f"{block}.conv2.weight", 1))))
    for s, width in enumerate(config.widths):
        blocks = range(s * config.blocks, (s + 1) * config.blocks)
        writers = [Slice("stem.weight", 0, scored=False), *_bn("stem_bn")] if s == 0 else [
            Slice(f"blocks.{blocks[0]}.proj.weight", 0, scored=False), *_bn(f"blocks.{blocks[0]}.proj_bn")]
        for b in blocks:
            writers += [Slice(f"blocks.{b}.conv2.weight", 0, scored=False), *_bn(f"blocks.{b}.bn2")]
        readers = [Slice(f"blocks.{b}.conv1.weight", 1) for b in blocks if not config.projects(b)]
        if s + 1 < len(config.widths):
            first = (s + 1) * config.blocks
            readers += [Slice(f"blocks.{first}.conv1.weight", 1), Slice(f"blocks.{first}.proj.weight", 1)]
        else:
            readers.append(Slice("head.weight", 1))
        groups.append(Group("widths", s, width, 1, tuple(writers + readers)))
    return groups


def _vit_groups(config: ViTNetConfig) -> list[Group]:
    groups = []
    for layer in range(config.layers):
        attention, mlp = f"vit.layers.{layer}.attention", f"vit.layers.{layer}.mlp"
        qkv = [Slice(f"{attention}.{p}_proj.{t}", 0) for p in "qkv" for t in ("weight", "bias")]
        groups.append(Group("layer_heads", layer, config.layer_heads[layer], config.head_dim,
                            (*qkv, Slice(f"{attention}.o_proj.weight", 1))))
        groups.append(Group("layer_mlp", layer, config.layer_mlp[layer], 1, (
            Slice(f"{mlp}.fc1.weight", 0), Slice(f"{mlp}.fc1.bias", 0), Slice(f"{mlp}.fc2.weight", 1))))
    return groups


def groups_for(config: NetConfig) -> list[Group]:
    return _resnet_groups(config) if isinstance(config, ResNetConfig) else _vit_groups(config)


def unit_norms(state: Mapping[str, torch.Tensor], group: Group) -> torch.Tensor:
    """[size] L2 norm of each unit's scored entries (differentiable: the regulariser uses it)."""
    squares = 0
    for piece in group.slices:
        if piece.scored:
            tensor = state[piece.name].movedim(piece.dim, 0)  # [size * unit, ...]
            squares = squares + tensor.reshape(group.size, -1).square().sum(1)
    return (squares + 1e-20).sqrt()  # the epsilon keeps the gradient finite at a unit that reached zero


def keep_units(state: Mapping[str, torch.Tensor], group: Group, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """`state` with only the units `keep` (sorted indices into the group) left in every coupled slice."""
    entries = (keep[:, None] * group.unit + torch.arange(group.unit)).flatten()  # [len(keep) * unit]
    out = dict(state)
    for piece in group.slices:
        out[piece.name] = state[piece.name].index_select(piece.dim, entries)
    return out

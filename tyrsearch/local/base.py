"""The seam for local pruning criteria: one layer, one unit type, a number of units to keep.

This is the *importance* half of the Torch-Pruning split. A criterion sees a `UnitGroup` (plain
tensors grouped by unit, plus the consumer-input statistics) and never the layer itself, so it cannot
branch on layer types: the adapter owns the coupling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from tyrsearch.models import KeptUnits, UnitGroup


class Criterion(ABC):
    """Chooses which units of one group to keep."""

    name: ClassVar[str]
    needs_stats: ClassVar[bool] = False  # consumer-input x^T x and sums from calibration
    needs_gradients: ClassVar[bool] = False  # first-order saliency from the calibration loss

    @abstractmethod
    def select(self, group: UnitGroup, keep: int) -> KeptUnits:
        """Keep `keep` units in every block of `group`."""

    def select_many(self, group: UnitGroup, keeps: list[int]) -> dict[int, KeptUnits]:
        """One selection per distinct keep (criteria with nested removal paths do it in one pass)."""
        return {keep: self.select(group, keep) for keep in set(keeps)}


class ScoreCriterion(Criterion):
    """A criterion that scores units independently and keeps the highest scores in each block."""

    @abstractmethod
    def scores(self, group: UnitGroup) -> torch.Tensor:
        """[U] importance of each unit, higher is kept."""

    def select(self, group: UnitGroup, keep: int) -> KeptUnits:
        return KeptUnits(kept=top_per_block(self.scores(group), blocks=group.blocks, keep=keep))


def top_per_block(scores: torch.Tensor, *, blocks: int, keep: int) -> torch.Tensor:
    """Indices of the `keep` best units of each of `blocks` consecutive runs, ascending."""
    per_block = scores.reshape(blocks, -1)  # [blocks, U / blocks]
    best = per_block.topk(keep, dim=1).indices.cpu() + torch.arange(blocks)[:, None] * per_block.shape[1]
    return best.reshape(-1).sort().values  # unit indices live on the CPU, whatever device scored them


def column_norms_sq(group: UnitGroup) -> torch.Tensor:
    """[U * width] squared L2 norm of each consumer column."""
    consumer = group.consumer.double()
    return consumer.pow(2).sum(0).reshape(-1)

"""Random units: the floor every other criterion must beat. Seeded, so runs repeat."""

import torch

from tyrsearch.local.base import ScoreCriterion
from tyrsearch.models import UnitGroup


class Random(ScoreCriterion):
    name = "random"

    def __init__(self, *, seed: int = 0):
        self._generator = torch.Generator().manual_seed(seed)

    def scores(self, group: UnitGroup) -> torch.Tensor:
        return torch.rand(group.units, generator=self._generator, dtype=torch.float64)

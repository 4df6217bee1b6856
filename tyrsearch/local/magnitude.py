"""Weight magnitude: the L2 norm of every weight coupled to a unit. Data-free."""

import torch

from tyrsearch.local.base import ScoreCriterion
from tyrsearch.models import UnitGroup


class Magnitude(ScoreCriterion):
    name = "magnitude"

    def scores(self, group: UnitGroup) -> torch.Tensor:
        total = group.consumer.double().pow(2).sum(dim=(0, 2))  # [U]
        for producer in group.producers:
            total = total + producer.double().pow(2).sum(dim=(1, 2))
        return total.sqrt()

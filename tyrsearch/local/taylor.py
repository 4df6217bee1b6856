"""First-order Taylor: |sum over a unit's coupled weights of w * dL/dw| (LLM-Pruner's group Taylor)."""

import torch

from tyrsearch.local.base import ScoreCriterion
from tyrsearch.models import UnitGroup


class Taylor(ScoreCriterion):
    name = "taylor"
    needs_gradients = True

    def scores(self, group: UnitGroup) -> torch.Tensor:
        return group.saliency.double().abs()

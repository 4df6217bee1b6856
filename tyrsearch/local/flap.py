"""FLAP (An et al. 2024): keep the units whose input fluctuates most; a bias absorbs the rest.

Score of a consumer column j: Var(x_j) * ||W[:, j]||^2 (the fluctuation metric), summed per unit.
A removed column's mean contribution W[:, j] * E[x_j] is added to the consumer's bias, so the layer's
output keeps its expected value.
"""

import torch

from tyrsearch.local.base import ScoreCriterion, column_norms_sq, top_per_block
from tyrsearch.models import KeptUnits, UnitGroup


class Flap(ScoreCriterion):
    name = "flap"
    needs_stats = True

    def scores(self, group: UnitGroup) -> torch.Tensor:
        n = group.tokens
        mean = group.x_sum / n
        variance = (group.xtx.diagonal() / n - mean.pow(2)).clamp_min(0) * n / max(n - 1, 1)
        return (variance * column_norms_sq(group)).reshape(group.units, group.width).sum(1)

    def select(self, group: UnitGroup, keep: int) -> KeptUnits:
        kept = top_per_block(self.scores(group), blocks=group.blocks, keep=keep)
        removed = torch.ones(group.units, dtype=torch.bool)
        removed[kept] = False
        cols = group.columns(removed.nonzero().squeeze(1))
        consumer = group.consumer.reshape(group.consumer.shape[0], -1).double()  # [out, U * width]
        bias = consumer[:, cols] @ (group.x_sum[cols].to(consumer.device) / group.tokens)  # [out]
        return KeptUnits(kept=kept, bias_shift=bias)

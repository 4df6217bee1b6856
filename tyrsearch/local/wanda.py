"""Structured Wanda (Wanda-sp): |W| times the input-activation norm, summed over a unit's columns."""

import torch

from tyrsearch.local.base import ScoreCriterion
from tyrsearch.models import UnitGroup


class Wanda(ScoreCriterion):
    name = "wanda"
    needs_stats = True

    def scores(self, group: UnitGroup) -> torch.Tensor:
        x_norm = group.xtx.diagonal().clamp_min(0).sqrt()  # [U * width] ||x_j|| over calibration tokens
        weight = group.consumer.double().abs().sum(0).reshape(-1)  # [U * width] sum_i |W_ij|
        return (weight * x_norm).reshape(group.units, group.width).sum(1)

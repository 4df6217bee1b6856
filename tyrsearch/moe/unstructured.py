"""STUN's second stage: unstructured pruning of the weights the expert stage kept, chosen by name.

The stage sees each decoder layer as a list of `Matrix`: a weight W [rows, in] (a view of the model's
parameter, so zeroing it zeroes the model's weight) and ||x_j|| [in], the norm over the calibration
tokens of the input that W reads. Attention projections, each routed expert's gate_up and down
matrices and a dense MLP's projections are all matrices alike (a layer's kind never matters here);
routers stay dense (they decide the routing and are a tiny share of the weights).

Zeroed weights stay in the dense tensors (the saved model has its full shapes). Inside every matrix,
Wanda's score |W_ij| * ||x_j|| is compared within each output row (Sun et al.): a layer at sparsity s
zeros round(s * rows * in) weights of each matrix, spread over the rows as evenly as integers allow,
the lowest scores of each row first. A matrix that saw no calibration token (an expert never selected)
has all-zero norms and is scored by |W_ij| alone.

How much each layer gets (the seam, `LayerSparsity`):
- `wanda`: every layer at the stage's sparsity;
- `owl` (Yin et al.): layers with more outliers (scores above m times the layer mean) are pruned less,
  layer sparsities spread linearly over 2 * lam by outlier ratio and shifted so that the size-weighted
  mean is the stage's sparsity (as `tyrsearch.allocation.owl` does for structured units);
- `none`: nothing.
With `semi_structured` every matrix is 2:4 instead: in each row, of every 4 consecutive input columns
the 2 lowest scores are zeroed (50% of every matrix, what sparse tensor cores accelerate).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from tyrsearch.allocation import outlier_ratio
from tyrsearch.errors import UserError


@dataclass(frozen=True)
class Matrix:
    weight: torch.Tensor  # [rows, in]: a view of a parameter, zeroed in place
    norm: torch.Tensor  # [in] float64: ||x_j|| over the calibration tokens W saw

    def scores(self) -> torch.Tensor:
        """[rows, in] float64 Wanda scores (|W| alone where the matrix saw no token)."""
        norm = self.norm if bool(self.norm.any()) else torch.ones_like(self.norm)
        return self.weight.detach().double().abs() * norm[None, :]


def size(layer: list[Matrix]) -> int:
    return sum(m.weight.numel() for m in layer)


class LayerSparsity(ABC):
    name: ClassVar[str]

    @abstractmethod
    def layer_sparsities(self, layers: list[list[Matrix]], sparsity: float) -> list[float]:
        """Each layer's share of its matrices' weights to zero; their size-weighted mean is `sparsity`."""


class WandaSparsity(LayerSparsity):
    name = "wanda"

    def layer_sparsities(self, layers: list[list[Matrix]], sparsity: float) -> list[float]:
        return [sparsity] * len(layers)


class OwlSparsity(LayerSparsity):
    name = "owl"

    def __init__(self, *, lam: float = 0.08, m: float = 5.0):
        self.lam, self.m = lam, m

    def layer_sparsities(self, layers: list[list[Matrix]], sparsity: float) -> list[float]:
        ratios = torch.tensor([outlier_ratio([(x.weight, x.norm) for x in layer], m=self.m) if layer else 0.0
                               for layer in layers], dtype=torch.float64)
        spread = (ratios - ratios.min()) / (ratios.max() - ratios.min()).clamp_min(1e-12) * 2 * self.lam
        sizes = torch.tensor([size(layer) for layer in layers], dtype=torch.float64)

        def at(shift: float) -> torch.Tensor:
            return (shift - spread).clamp(0, 1)

        # the size-weighted mean of at(shift) grows with shift: bisect for the one that hits `sparsity`
        lo, hi = 0.0, 1.0 + 2 * self.lam
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((at(mid) * sizes).sum() / sizes.sum()) < sparsity else (lo, mid)
        return at(hi).tolist()


class NoUnstructured(LayerSparsity):
    name = "none"

    def layer_sparsities(self, layers: list[list[Matrix]], sparsity: float) -> list[float]:
        return [0.0] * len(layers)


STAGES: dict[str, type[LayerSparsity]] = {cls.name: cls for cls in (WandaSparsity, OwlSparsity, NoUnstructured)}


def make_stage(name: str) -> LayerSparsity:
    if name not in STAGES:
        raise UserError(f"unknown unstructured stage {name!r}: choose one of {', '.join(STAGES)}")
    return STAGES[name]()


@torch.no_grad()
def prune_rows_(matrix: Matrix, sparsity: float) -> None:
    """Zero round(sparsity * W.numel()) weights, the lowest scores of each row, rows as even as integers allow."""
    rows, cols = matrix.weight.shape
    total = round(sparsity * rows * cols)
    per_row = torch.full((rows,), total // rows)
    per_row[: total % rows] += 1
    order = matrix.scores().argsort(dim=1, stable=True)  # [rows, in]: column indices, lowest score first
    lowest = torch.arange(cols)[None, :] < per_row[:, None]  # [rows, in]: the first per_row places of each row
    matrix.weight.masked_fill_(torch.zeros_like(lowest).scatter_(1, order, lowest), 0)


@torch.no_grad()
def prune_2_4_(matrix: Matrix) -> None:
    """In every row, zero the 2 lowest scores of each 4 consecutive input columns."""
    rows, cols = matrix.weight.shape
    if cols % 4:
        raise UserError(f"2:4 sparsity needs input sizes divisible by 4; a {rows} x {cols} matrix is not: "
                        "drop --semi-structured")
    groups = matrix.scores().reshape(rows, cols // 4, 4)  # [rows, groups, 4]
    lowest = groups.argsort(dim=2, stable=True)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    matrix.weight.masked_fill_(mask.reshape(rows, cols), 0)


def prune_(layers: list[list[Matrix]], sparsities: list[float], *, semi_structured: bool = False) -> None:
    """Zero each layer's matrices at its sparsity (per output row), or 2:4 in every matrix."""
    for layer, sparsity in zip(layers, sparsities, strict=True):
        for matrix in layer:
            if semi_structured:
                prune_2_4_(matrix)
            elif sparsity > 0:
                prune_rows_(matrix, sparsity)

"""OSSCAR / OBS-style structured removal with a least-squares refit of the consumer.

With x the consumer's input and H = sum x x^T over calibration tokens, removing a set S of input
columns of W and letting the other columns compensate optimally costs (Optimal Brain Surgeon)

    loss(S) = tr(W_S (Hinv_SS)^-1 W_S^T)

Units are removed in rounds, cheapest first; after each round W and Hinv are updated as if the removed
columns were gone (OBS update), so later scores see the compensation. Finally the kept columns are
refit exactly by least squares against the dense output: W_K = W H[:, K] (H_KK)^-1.
"""

import math

import torch

from tyrsearch.local.base import Criterion
from tyrsearch.models import Selection, UnitGroup


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I: keeps the inverse finite when columns are (near) dead."""
    return h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)


def least_squares_refit(weight: torch.Tensor, h: torch.Tensor, cols: torch.Tensor, *,
                        damp: float) -> torch.Tensor:
    """[out, K]: the columns `cols` of a consumer refit to reproduce weight @ x from x[cols] alone."""
    h_kk = damped(h[cols][:, cols], damp)
    rhs = (weight @ h[:, cols]).T  # [K, out]
    return torch.linalg.solve(h_kk, rhs).T


class Osscar(Criterion):
    name = "osscar"
    needs_stats = True

    def __init__(self, *, rounds: int = 16, damp: float = 0.01):
        self.rounds = rounds
        self.damp = damp

    def _removal_costs(self, weight: torch.Tensor, h_inv: torch.Tensor, group: UnitGroup,
                       candidates: torch.Tensor) -> torch.Tensor:
        """[C] OBS loss of removing each candidate unit alone: tr(W_u (Hinv_uu)^-1 W_u^T)."""
        cols = group.columns(candidates).reshape(len(candidates), group.width)  # [C, width]
        h_blocks = h_inv[cols[:, :, None], cols[:, None, :]]  # [C, width, width]
        w_blocks = weight[:, cols]  # [out, C, width]
        gram = torch.einsum("oci,ocj->cij", w_blocks, w_blocks)  # [C, width, width]: W_u^T W_u
        return (torch.linalg.inv(h_blocks) * gram).sum(dim=(1, 2))

    def select(self, group: UnitGroup, keep: int) -> Selection:
        units, blocks = group.units, group.blocks
        dense = group.consumer.reshape(group.consumer.shape[0], -1).double()  # [out, U * width]
        h = group.xtx.double()
        weight = dense.clone()
        h_inv = torch.linalg.inv(damped(h, self.damp))
        alive = torch.ones(units, dtype=torch.bool)
        to_remove = (units // blocks - keep) * blocks
        per_round = max(1, math.ceil(to_remove / self.rounds))
        block_of = torch.arange(units) // (units // blocks)
        removed_per_block = torch.zeros(blocks, dtype=torch.long)
        while removed_per_block.sum() < to_remove:
            open_blocks = removed_per_block < units // blocks - keep
            candidates = (alive & open_blocks[block_of]).nonzero().squeeze(1)
            costs = self._removal_costs(weight, h_inv, group, candidates)
            chosen = []
            for idx in costs.argsort().tolist():  # cheapest first, within each block's quota
                unit = candidates[idx].item()
                b = block_of[unit].item()
                if removed_per_block[b] < units // blocks - keep and len(chosen) < per_round:
                    chosen.append(unit)
                    removed_per_block[b] += 1
            chosen_t = torch.tensor(chosen)
            alive[chosen_t] = False
            cols = group.columns(chosen_t)
            # OBS update: remove columns `cols`, compensate through the others
            pivot = torch.linalg.inv(h_inv[cols][:, cols])  # [|cols|, |cols|]
            weight = weight - weight[:, cols] @ pivot @ h_inv[cols]
            h_inv = h_inv - h_inv[:, cols] @ pivot @ h_inv[cols]
            # the removed entries are now ~0 up to rounding: make them exactly 0, since subnormal
            # leftovers slow every later float64 op on them down by orders of magnitude
            weight[:, cols] = 0
            h_inv[cols] = 0
            h_inv[:, cols] = 0
        kept = alive.nonzero().squeeze(1)
        refit = least_squares_refit(dense, h, group.columns(kept), damp=self.damp)
        return Selection(kept=kept, consumer=refit)

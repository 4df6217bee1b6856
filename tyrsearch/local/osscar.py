"""OSSCAR / OBS-style structured removal with a least-squares refit of the consumer.

With x the consumer's input and H = sum x x^T over calibration tokens, removing a set S of input
columns of W and letting the other columns compensate optimally costs (Optimal Brain Surgeon)

    loss(S) = tr(W_S (Hinv_SS)^-1 W_S^T)

Units are removed in rounds (removing all would take `rounds` rounds), cheapest first; after each
round W and Hinv are updated as if the removed columns were gone (OBS update), so later scores see the
compensation. Finally the kept columns are
refit exactly by least squares against the dense output: W_K = W H[:, K] (H_KK)^-1.
"""

import math

import torch

from tyrsearch.local.base import Criterion
from tyrsearch.models import KeptUnits, UnitGroup


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I: keeps the inverse finite when columns are (near) dead."""
    return h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def least_squares_refit(weight: torch.Tensor, h: torch.Tensor, cols: torch.Tensor, *,
                        damp: float) -> torch.Tensor:
    """[out, K]: the columns `cols` of a consumer refit to reproduce weight @ x from x[cols] alone."""
    h_kk = damped(h[cols][:, cols], damp)
    rhs = (weight @ h[:, cols]).T  # [K, out]
    return torch.linalg.solve(h_kk, rhs).T


class Osscar(Criterion):
    name = "osscar"
    needs_stats = True
    solve_dtype = torch.float64  # whatever the model's dtype: see the README's "Devices and precision"

    def __init__(self, *, rounds: int = 64, damp: float = 0.01):
        self.rounds = rounds
        self.damp = damp

    def _removal_costs(self, weight: torch.Tensor, h_inv: torch.Tensor, group: UnitGroup,
                       candidates: torch.Tensor) -> torch.Tensor:
        """[C] OBS loss of removing each candidate unit alone: tr(W_u (Hinv_uu)^-1 W_u^T)."""
        cols = group.columns(candidates).reshape(len(candidates), group.width)  # [C, width]
        h_blocks = h_inv[cols[:, :, None], cols[:, None, :]]  # [C, width, width]
        w_blocks = weight[:, cols]  # [out, C, width]
        if group.width == 1:  # many 1x1 blocks: elementwise ops beat batched matmul / inverse by ~100x
            return w_blocks.pow(2).sum(dim=(0, 2)) / h_blocks[:, 0, 0]
        gram = w_blocks.permute(1, 2, 0) @ w_blocks.permute(1, 0, 2)  # [C, width, width]: W_u^T W_u
        return (torch.linalg.inv(h_blocks) * gram).sum(dim=(1, 2))

    def select(self, group: UnitGroup, keep: int) -> KeptUnits:
        return self.select_many(group, [keep])[keep]

    def select_many(self, group: UnitGroup, keeps: list[int]) -> dict[int, KeptUnits]:
        """One greedy removal path down to the smallest keep, with a snapshot at every keep on the way:
        removal is nested, so all levels of a layer cost about one selection."""
        units, blocks = group.units, group.blocks
        per_block = units // blocks
        dense = group.consumer.reshape(group.consumer.shape[0], -1).to(self.solve_dtype)  # [out, U * width]
        h = group.xtx.to(device=dense.device, dtype=self.solve_dtype)
        weight = dense.clone()
        h_inv = torch.linalg.inv(damped(h, self.damp))
        alive = torch.ones(units, dtype=torch.bool)
        block_of = torch.arange(units) // per_block
        removed_per_block = torch.zeros(blocks, dtype=torch.long)
        # a fixed round size, so that a removal path does not depend on where it stops
        per_round = max(1, math.ceil(units / self.rounds))
        kept_at = {}
        for keep in sorted(set(keeps), reverse=True):
            while (removed_per_block < per_block - keep).any():
                quota = per_block - keep - removed_per_block  # [blocks] still to remove to reach `keep`
                candidates = (alive & (quota > 0)[block_of]).nonzero().squeeze(1)
                costs = self._removal_costs(weight, h_inv, group, candidates)
                # cheapest first, at most `per_round`, never more from a block than its quota
                ranked = candidates[costs.argsort().cpu()]  # unit bookkeeping stays on the CPU
                ranked_block = block_of[ranked]
                one_hot = torch.nn.functional.one_hot(ranked_block, blocks)  # [C, blocks]
                rank_in_block = (one_hot.cumsum(0) * one_hot).sum(1) - 1
                chosen = ranked[rank_in_block < quota[ranked_block]][:per_round]
                removed_per_block += torch.bincount(block_of[chosen], minlength=blocks)
                alive[chosen] = False
                cols = group.columns(chosen)
                # OBS update: remove columns `cols`, compensate through the others
                pivot = torch.linalg.inv(h_inv[cols][:, cols])  # [|cols|, |cols|]
                weight = weight - weight[:, cols] @ pivot @ h_inv[cols]
                h_inv = h_inv - h_inv[:, cols] @ pivot @ h_inv[cols]
                # the removed entries are now ~0 up to rounding: make them exactly 0
                weight[:, cols] = 0
                h_inv[cols] = 0
                h_inv[:, cols] = 0
            kept_at[keep] = alive.nonzero().squeeze(1)
        return {keep: KeptUnits(kept=kept, consumer=least_squares_refit(dense, h, group.columns(kept),
                                                                        damp=self.damp) if len(kept) else None)
                for keep, kept in kept_at.items()}

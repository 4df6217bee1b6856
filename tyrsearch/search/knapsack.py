"""Knapsack allocation over per-layer sensitivity curves (the Týr / EvoPress starting point).

Every (layer, unit type, level) of the supernet is evaluated alone (that layer at that level, every
other layer dense): its KL divergence to the dense model is its cost in quality. Assuming these add up,
a dynamic program picks one level per (layer, unit type) that removes at least the target share of the
parameters with the least summed KL. The evolutionary search starts from here; on its own it is a
one-shot allocation that already beats uniform and OWL by far.
"""

from __future__ import annotations

import math
import time
from functools import reduce

import torch
from torch import nn
from tqdm.auto import tqdm

from tyrsearch import allocation, metrics
from tyrsearch.budget import Budget, ParamsBudget
from tyrsearch.errors import UserError
from tyrsearch.local import Criterion
from tyrsearch.models import LayerShape, adapter_for
from tyrsearch.search.candidates import CandidateEvaluator, Levels
from tyrsearch.space import SearchSpace
from tyrsearch.supernet import Supernet, build_supernet

Key = tuple[int, str, int]  # (layer, unit type, level)


def layer_sensitivity(model: nn.Module, supernet: Supernet, reference: metrics.Reference, *,
                      progress: bool = True) -> dict[Key, float]:
    """KL to the dense model of each variant alone (0 for a level that keeps every unit). The dense
    hidden states entering every layer are cached, so a variant of layer l only runs layers l.."""
    dense = adapter_for(model).shapes(model)
    evaluator = CandidateEvaluator(model=model, supernet=supernet, reference=reference)
    unpruned: Levels = [{} for _ in dense]  # no unit type cut anywhere: the dense model
    evaluator.set_parent(unpruned)
    keys = [(idx, unit, level) for idx, units in enumerate(supernet.grid) for unit in units
            for level in range(-supernet.levels, supernet.levels + 1)]
    kl: dict[Key, float] = {}
    by_keep: dict[tuple[int, str, int], float] = {}  # clipped levels share a variant
    for idx, unit, level in tqdm(keys, desc="sensitivity", disable=not progress):
        keep = supernet.keep(idx, unit, level)
        if keep == dense[idx].units(unit):
            kl[(idx, unit, level)] = 0.0
            continue
        if (idx, unit, keep) not in by_keep:
            levels = [dict(layer) for layer in unpruned]
            levels[idx] = {unit: level}
            by_keep[(idx, unit, keep)] = evaluator.fitness(levels, evaluator.sequences)
        kl[(idx, unit, level)] = by_keep[(idx, unit, keep)]
    return kl


def removed_price(supernet: Supernet, dense: list[LayerShape], budget: Budget) -> dict[Key, int]:
    """What each variant removes from its dense layer's price, in the budget's resolution (attention and
    MLP add up independently). Rounded down: summed over many blocks, rounding to the nearest could claim
    more savings than there are and put the start candidate of a latency budget over its limit."""
    removed = {}
    for idx, units in enumerate(supernet.grid):
        for unit in units:
            for level in range(-supernet.levels, supernet.levels + 1):
                cut = dense[idx].with_units(unit, supernet.keep(idx, unit, level))
                saved = budget.layer(dense[idx]) - budget.layer(cut)
                removed[(idx, unit, level)] = math.floor(saved / budget.resolution)
    return removed


def knapsack(items: list[list[tuple[int, float]]], budget: int) -> list[int]:
    """One option per item, (cost, loss) each, with the least total loss among the choices whose total
    cost is the smallest reachable one >= budget (so the budget is met as exactly as the costs allow).

    Exact dynamic program over costs in units of their greatest common divisor. A cost may be negative
    (a measured latency that rose when a layer shrank), so the states span every reachable total.
    """
    quantum = reduce(math.gcd, [c for options in items for c, _ in options if c] + [budget]) or 1
    target = math.ceil(budget / quantum)
    # every partial total lies in [low, high]: the start (0) and whatever the items add or take away
    low = sum(min(0, *(c for c, _ in options)) for options in items) // quantum
    high = sum(max(0, *(c for c, _ in options)) for options in items) // quantum
    if target > sum(max(c for c, _ in options) for options in items) // quantum:
        raise UserError("the target cannot be reached within the search space's levels: lower the target "
                        "or widen the space (more levels, a larger step, lower min_keep)")
    size = high - low + 1
    best = torch.full((size,), float("inf"), dtype=torch.float64)  # [state]: least loss of total low + state
    best[-low] = 0.0  # the empty choice
    choices, parents = [], []
    for options in items:
        new = torch.full_like(best, float("inf"))
        choice = torch.full((size,), -1, dtype=torch.long)
        parent = torch.full((size,), -1, dtype=torch.long)
        for o, (cost, loss) in enumerate(options):
            shift = cost // quantum  # state s moves to s + shift
            proposal = torch.full_like(best, float("inf"))
            if shift >= 0:
                proposal[shift:] = best[: size - shift] + loss
            else:
                proposal[: size + shift] = best[-shift:] + loss
            better = proposal < new
            new = torch.where(better, proposal, new)
            choice = torch.where(better, o, choice)
            parent = torch.where(better, torch.arange(size) - shift, parent)
        best = new
        choices.append(choice)
        parents.append(parent)
    first = max(target - low, 0)
    picked, state = [], first + int(torch.isfinite(best[first:]).nonzero()[0])
    for choice, parent in zip(reversed(choices), reversed(parents), strict=True):
        picked.append(int(choice[state]))
        state = int(parent[state])
    return picked[::-1]


def knapsack_levels(model: nn.Module, supernet: Supernet, reference: metrics.Reference, *, budget: Budget,
                    target: float, progress: bool = True) -> tuple[Levels, float]:
    """One level per (layer, unit type) with the least summed single-variant KL that removes the smallest
    reachable share >= `target` of the dense model's price; returns the levels and their predicted KL."""
    dense = adapter_for(model).shapes(model)
    kl = layer_sensitivity(model, supernet, reference, progress=progress)
    removed = removed_price(supernet, dense, budget)
    slots = [(idx, unit) for idx, units in enumerate(supernet.grid) for unit in units]
    level_range = range(-supernet.levels, supernet.levels + 1)
    items = [[(removed[(idx, unit, lv)], kl[(idx, unit, lv)]) for lv in level_range] for idx, unit in slots]
    picked = knapsack(items, math.ceil(target * budget.total(dense) / budget.resolution - 1e-6))
    levels: Levels = [{} for _ in dense]
    for (idx, unit), option in zip(slots, picked, strict=True):
        levels[idx][unit] = level_range[option]
    return levels, sum(kl[(idx, unit, lv)] for idx, units in enumerate(levels) for unit, lv in units.items())


def knapsack_prune(model: nn.Module, criterion: Criterion, batches: torch.Tensor, *, sparsity: float,
                   space: SearchSpace, sensitivity_batches: torch.Tensor, progress: bool = True) -> dict:
    """Prune `model` in place to `sparsity` with the knapsack allocation; returns what was done."""
    allocation.check_sparsity(sparsity)
    adapter = adapter_for(model)
    dense = adapter.shapes(model)
    dims = adapter.dims(model)
    start = time.perf_counter()
    centre = allocation.uniform(dense, sparsity=sparsity, dims=dims)
    supernet = build_supernet(model, criterion, batches, space=space, centre=centre, progress=progress)
    built = time.perf_counter()
    reference = metrics.dense_topk(model, sensitivity_batches, k=space.fitness.top_k, progress=False)
    levels, predicted_kl = knapsack_levels(model, supernet, reference, budget=ParamsBudget(dims=dims), target=sparsity,
                                           progress=progress)
    supernet.apply(model, levels)
    done = time.perf_counter()
    return {
        "criterion": criterion.name,
        "allocation": "knapsack",
        "target_sparsity": sparsity,
        "achieved_sparsity": allocation.sparsity_of(adapter.shapes(model), dense, dims),
        "predicted_kl": predicted_kl,
        "layers": [s.block_config() for s in adapter.shapes(model)],
        "time_s": {"supernet": built - start, "sensitivity_and_knapsack": done - built},
    }

"""Knapsack allocation: the dynamic program is exact, and it prunes a real (tiny) model to the budget."""

import itertools
import random

import pytest
import torch

from tests.conftest import tiny_llama
from tyrsearch.errors import UserError
from tyrsearch.local import make_criterion
from tyrsearch.metrics import dense_topk
from tyrsearch.models import MLP, Q_HEADS, adapter_for
from tyrsearch.search.knapsack import knapsack, knapsack_prune, layer_sensitivity
from tyrsearch.space import Fitness, SearchSpace, Stage, UnitSpace
from tyrsearch.supernet import build_supernet

SPACE = SearchSpace(family="llama", units={Q_HEADS: UnitSpace(min_keep=0, step=1), MLP: UnitSpace(min_keep=0, step=8)},
                    levels=3, iterations=1, generations=1, offspring=4, selection=(Stage(survivors=4, tokens=64),),
                    fitness=Fitness(top_k=16))


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    lowest = -3 if seed % 3 == 0 else 0  # negative costs: a measured latency that rose when a layer shrank
    items = [[(rng.randrange(lowest, 7) * 6, rng.random()) for _ in range(rng.randrange(1, 4))] for _ in range(4)]
    budget = rng.randrange(-10 if lowest else 0, 50)
    feasible = [(sum(items[i][o][0] for i, o in enumerate(combo)), sum(items[i][o][1] for i, o in enumerate(combo)),
                 combo)
                for combo in itertools.product(*[range(len(opts)) for opts in items])
                if sum(items[i][o][0] for i, o in enumerate(combo)) >= budget]
    if not feasible:
        with pytest.raises(UserError, match="cannot be reached"):
            knapsack(items, budget)
        return
    least = min(cost for cost, _, _ in feasible)  # the budget is met as exactly as the costs allow
    picked = knapsack(items, budget)
    assert sum(items[i][o][0] for i, o in enumerate(picked)) == least
    assert sum(items[i][o][1] for i, o in enumerate(picked)) == pytest.approx(
        min(loss for cost, loss, _ in feasible if cost == least))


def test_sensitivity_is_zero_for_dense_levels_and_grows_with_cuts(tokens):
    model = tiny_llama()
    centre = [s.with_units(MLP, 32) for s in adapter_for(model).shapes(model)]
    net = build_supernet(model, make_criterion("osscar"), tokens, space=SPACE, centre=centre, progress=False)
    kl = layer_sensitivity(model, net, dense_topk(model, tokens[:2], k=16, progress=False), progress=False)
    assert kl[(0, Q_HEADS, -1)] == 0.0  # keeps all 3 heads per group
    assert kl[(0, Q_HEADS, 3)] > 0 and kl[(1, MLP, 3)] > 0
    assert all(v >= 0 for v in kl.values())


def test_knapsack_prune_meets_the_budget(tokens):
    model = tiny_llama()
    before = model(tokens).logits
    report = knapsack_prune(model, make_criterion("osscar"), tokens, sparsity=0.4, space=SPACE,
                            sensitivity_batches=tokens[:2], progress=False)
    assert 0.4 <= report["achieved_sparsity"] < 0.5
    assert report["allocation"] == "knapsack" and report["predicted_kl"] > 0
    logits = model(tokens).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, before)

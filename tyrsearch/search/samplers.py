"""Optuna samplers over per-layer levels, generation by generation, with the global budget kept exact.

A study holds one trial per candidate. Its params are levels named `L03.mlp` (layer 3, MLP channels);
the iteration's grid (units kept per level) and start candidate live in the study's user attrs, so any
process that opens the study sees the same space. The search plans each generation as WAITING trials
numbered (iteration, generation, index) in their system attrs and asks the sampler to `propose` each
one's levels; workers then claim and evaluate them (see `worker.py`). Generation 0 is the start
candidate alone, then generations of up to `offspring` trials each.

- `EvolutionSampler` (Tyr / EvoPress): offspring of the best complete trial so far (elitist) by 1-4
  level swaps between two layers of one unit type; a swap only where both moves shift the same price
  (parameters, FLOPs), so the budget is exact. A latency budget has a band instead (the iteration's
  `band`): swaps between any two blocks, attention and MLP alike, that keep the estimate within it.
  Never a candidate twice.
- `BudgetedSampler`: any Optuna sampler (TPE, CMA-ES) proposes; the proposal is then repaired to the
  start candidate's unit counts by single-level moves.
- `ParetoSampler`: NSGA-II proposes freely for several objectives (quality and a cost); no budget.

Why samplers and not Optuna's `BaseGASampler`: they are the study's sampler, so that `Study.tell` in any
worker reaches the wrapped TPE / CMA-ES / NSGA-II's `after_trial`; but they plan a whole generation before
anyone evaluates it (workers claim planned trials, a killed search re-plans the same candidates), where
`BaseGASampler` assigns generations as trials are asked for, one at a time. So the search calls `plan`
itself and the per-trial hooks have nothing to do; the budget is a wrapper (`BudgetedSampler` holds a
`ParetoSampler`), not a subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from tyrsearch.search import study as schema

STRATEGIES = ("evolution", "tpe", "cmaes", "nsga2")


def param_name(layer: int, unit: str) -> str:
    return f"L{layer:02d}.{unit}"


def parse_param(name: str) -> tuple[int, str]:
    layer, unit = name[1:].split(".", 1)
    return int(layer), unit


@dataclass(frozen=True)
class Current:
    """The iteration being searched and its record (set by the search)."""

    iteration: int
    record: schema.IterationRecord


def iteration_info(study: Study) -> Current:
    iteration = schema.current_iteration(study)
    return Current(iteration, schema.iteration_record(study, iteration))


def iteration_trials(study: Study, iteration: int) -> list[FrozenTrial]:
    """The iteration's trials that count (not failed), by number."""
    return [t for t in study.get_trials(deepcopy=False)
            if schema.iteration_of(t) == iteration and t.state != TrialState.FAIL]


def best_trial(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The complete trial of least fitness (the first objective), within the budget where any is (with
    several objectives candidates are not held to it)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return min(complete, key=lambda t: (not t.user_attrs.get("within_budget", True), t.values[0], t.number),
               default=None)


class _Grid:
    """Units kept per (param, level) of one iteration, and the moves that keep a unit type's count."""

    def __init__(self, *, levels: int, grid: list[dict[str, list[int]]], cost: dict[str, list[float]] | None = None,
                 band: list[float] | None = None):
        self.levels = levels
        # what a move trades: the block's price per level where the iteration records it (removing a
        # layer's last query heads also drops its k/v projections), else the units kept
        self.keeps = cost or {param_name(i, unit): keeps
                              for i, units in enumerate(grid) for unit, keeps in units.items()}
        self.band = band  # [lowest, highest] summed price: a latency budget, kept within a band
        self.by_unit: dict[str, list[str]] = {}
        for name in self.keeps:
            self.by_unit.setdefault(parse_param(name)[1], []).append(name)
        if self.band:  # any two blocks may trade: latency prices attention and MLP in one currency
            self.by_unit = {"any": sorted(self.keeps)}

    @classmethod
    def of(cls, record: schema.IterationRecord) -> _Grid:
        return cls(levels=record.levels, grid=record.grid, cost=record.cost, band=record.band)

    def space(self) -> dict[str, BaseDistribution]:
        return {name: IntDistribution(-self.levels, self.levels) for name in self.keeps}

    def keep(self, name: str, level: int) -> int:
        return self.keeps[name][level + self.levels]

    def shift(self, name: str, level: int, move: int) -> int | None:
        """Units removed by moving `name` from `level` by `move` levels (None outside the grid)."""
        if not -self.levels <= level + move <= self.levels:
            return None
        return self.keep(name, level) - self.keep(name, level + move)

    def totals(self, params: dict[str, int]) -> dict[str, int]:
        return {unit: sum(self.keep(n, params[n]) for n in names) for unit, names in self.by_unit.items()}

    def swap_fits(self, removed: float | None, added: float | None, params: dict[str, int]) -> bool:
        """May a swap that removes `removed` and adds back `-added` (None: off the grid) be made in `params`
        (the candidate before the swap)? Exact budgets: equal prices. A band: the new total stays in it."""
        if not removed or added is None:
            return False
        if not self.band:
            return removed == -added
        total = sum(self.keep(n, level) for n, level in params.items()) - removed - added
        return self.band[0] <= total <= self.band[1]


class GenerationalSampler(BaseSampler):
    """The shared frame: the generation sizes, the start candidate, the level space. Planned trials carry
    their levels as fixed params, so Optuna's own per-trial sampling hooks have nothing to do."""

    def __init__(self, *, offspring: int, seed: int = 0):
        self.offspring, self.seed = offspring, seed

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, int]:
        return {}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution):
        raise RuntimeError(f"{param_name} was not planned: trials of a search are created by the search")

    def generation_size(self, study: Study, generation: int) -> int:
        """Trials in `generation` of the current iteration (0 when there is nothing new to try)."""
        return 1 if generation == 0 else self.offspring

    def plan(self, study: Study, trial: FrozenTrial) -> dict[str, int]:
        """Levels for the planned (WAITING) `trial`, numbered in its system attrs."""
        info = iteration_info(study)
        if schema.generation_of(trial) == 0:
            return dict(info.record.start)
        return self.propose(study, trial, info, _Grid.of(info.record).space())

    def propose(self, study: Study, trial: FrozenTrial, info: Current,
                search_space: dict[str, BaseDistribution]) -> dict[str, int]:
        raise NotImplementedError

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])


class EvolutionSampler(GenerationalSampler):
    """Elitist (1 + N) evolution by budget-neutral level swaps (Tyr-the-Pruner, EvoPress)."""

    def __init__(self, *, offspring: int, seed: int = 0, max_swaps: int = 4):
        super().__init__(offspring=offspring, seed=seed)
        self.max_swaps = max_swaps
        self._generations: dict[tuple, list[dict[str, int]]] = {}

    def propose(self, study, trial, info, search_space):
        where = schema.place(trial)
        return self._children(study, info, where.generation)[where.index]

    def generation_size(self, study: Study, generation: int) -> int:
        return 1 if generation == 0 else len(self._children(study, iteration_info(study), generation))

    def _children(self, study: Study, info: Current, generation: int) -> list[dict[str, int]]:
        iteration = info.iteration
        key = (study._study_id, iteration, generation)
        if key not in self._generations:
            earlier = [t for t in iteration_trials(study, iteration)
                       if schema.generation_of(t) is not None and schema.generation_of(t) < generation]
            parent = best_trial(earlier)
            if parent is None:
                raise RuntimeError(f"generation {generation} has no complete parent trial yet")
            seen = {tuple(sorted(t.params.items())) for t in earlier}
            self._generations[key] = self.offspring_of(parent.params, _Grid.of(info.record), seen,
                                                       self._rng(iteration, generation))
        return self._generations[key]

    def offspring_of(self, parent: dict[str, int], grid: _Grid, seen: set[tuple],
                     rng: np.random.Generator) -> list[dict[str, int]]:
        """Up to `offspring` new candidates, each 1..max_swaps level swaps away from `parent` (fewer swaps more
        often: the smaller of two uniform draws)."""
        children: list[dict[str, int]] = []
        keys = set(seen) | {tuple(sorted(parent.items()))}
        units = sorted(u for u, names in grid.by_unit.items() if len(names) > 1)
        for _ in range(1000 * self.offspring):
            if len(children) == self.offspring or not units:
                break
            child = dict(parent)
            swaps = min(rng.integers(1, self.max_swaps + 1, size=2))
            for _ in range(swaps):
                names = grid.by_unit[units[rng.integers(len(units))]]
                up, down = (names[i] for i in rng.choice(len(names), size=2, replace=False))
                if grid.swap_fits(grid.shift(up, child[up], +1), grid.shift(down, child[down], -1), child):
                    child[up] += 1
                    child[down] -= 1
            key = tuple(sorted(child.items()))
            if key not in keys:
                keys.add(key)
                children.append(child)
        return children  # fewer than `offspring` once the parent's neighbourhood is exhausted


class ParetoSampler(GenerationalSampler):
    """Another Optuna sampler (NSGA-II) proposes levels as they are: no budget, the costs are objectives."""

    def __init__(self, base: BaseSampler, *, offspring: int, seed: int = 0):
        super().__init__(offspring=offspring, seed=seed)
        self.base = base

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def propose(self, study, trial, info, search_space):
        self.base.before_trial(study, trial)
        proposal = self.base.sample_relative(study, trial, search_space)
        for name, dist in search_space.items():
            if name not in proposal:
                proposal[name] = self.base.sample_independent(study, trial, name, dist)
        return self.unseen({k: int(v) for k, v in proposal.items()}, study, info, trial.number)

    def unseen(self, params: dict[str, int], study: Study, info: Current, number: int) -> dict[str, int]:
        """`params`, or where the iteration has that candidate already, random one-level moves away from
        it until it is new (GA samplers propose repeats; evaluating one twice would teach nothing)."""
        # evaluated trials have params; their siblings planned before them only the planned levels
        known = (t.params or schema.planned_params(t) for t in iteration_trials(study, info.iteration))
        seen = {tuple(sorted(params.items())) for params in known if params}
        rng, names, levels = self._rng(info.iteration, number), sorted(params), info.record.levels
        for _ in range(100):
            if tuple(sorted(params.items())) not in seen:
                break
            name = names[rng.integers(len(names))]
            params = {**params, name: int(np.clip(params[name] + rng.choice([-1, 1]), -levels, levels))}
        return params


class BudgetedSampler(GenerationalSampler):
    """Another Optuna sampler proposes levels (through a `ParetoSampler`, which keeps them new); single-level
    moves then restore the unit counts exactly."""

    def __init__(self, base: BaseSampler, *, offspring: int, seed: int = 0):
        super().__init__(offspring=offspring, seed=seed)
        self.free = ParetoSampler(base, offspring=offspring, seed=seed)

    def after_trial(self, study, trial, state, values):
        self.free.after_trial(study, trial, state, values)

    def propose(self, study, trial, info, search_space):
        grid = _Grid.of(info.record)
        return repair(self.free.propose(study, trial, info, search_space), grid, grid.totals(info.record.start),
                      self._rng(info.iteration, trial.number))


def repair(params: dict[str, int], grid: _Grid, totals: dict[str, int], rng: np.random.Generator) -> dict[str, int]:
    """Move random layers one level at a time until every unit type keeps `totals` units (or the
    closest count single-level moves reach)."""
    params = dict(params)
    for unit, names in grid.by_unit.items():
        for _ in range(100 * len(names) * (2 * grid.levels + 1)):
            excess = grid.totals(params)[unit] - totals[unit]  # units kept above the budget
            if excess == 0:
                break
            move = 1 if excess > 0 else -1  # a higher level keeps fewer units
            movable = [n for n in names if (grid.shift(n, params[n], move) or 0) * move > 0]
            fitting = [n for n in movable if abs(excess - grid.shift(n, params[n], move)) < abs(excess)]
            if not fitting:
                break
            name = fitting[rng.integers(len(fitting))]
            params[name] += move
    return params


def make_sampler(strategy: str, *, offspring: int, seed: int) -> GenerationalSampler:
    """The search strategy by name: evolution (default), tpe, cmaes, or nsga2 (several objectives)."""
    if strategy == "evolution":
        return EvolutionSampler(offspring=offspring, seed=seed)
    if strategy == "tpe":
        return BudgetedSampler(optuna.samplers.TPESampler(seed=seed, multivariate=True), offspring=offspring, seed=seed)
    if strategy == "cmaes":
        return BudgetedSampler(optuna.samplers.CmaEsSampler(seed=seed), offspring=offspring, seed=seed)
    if strategy == "nsga2":
        return ParetoSampler(optuna.samplers.NSGAIISampler(population_size=offspring, seed=seed),
                             offspring=offspring, seed=seed)
    raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")

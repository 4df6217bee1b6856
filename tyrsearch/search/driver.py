"""Coarse-to-fine global search (Tyr-the-Pruner) as one Optuna study.

    for each iteration k (the level step halves each time):
        supernet around the centre (uniform at first, then the previous winner), built or reused
        generation 0: the start candidate (knapsack over per-layer sensitivities, or the centre)
        generations 1..G: the sampler proposes N candidates; every candidate reports its fitness on
            the first stage's tokens, the SelectionPruner keeps the best for the next stage, ...;
            the last stage's survivors complete with their fitness on the most tokens
        winner_k: the best complete trial of the iteration (the parent competes: elitist)

Everything the search knows is in the study, so a rerun with the same storage resumes it: complete
generations are kept, trials left running by a killed process are marked failed and redone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from torch import nn
from tqdm.auto import tqdm

from tyrsearch import allocation, evaluate
from tyrsearch.errors import UserError
from tyrsearch.local import make_criterion
from tyrsearch.models import ATTENTION_UNITS, LayerShape, adapter_for
from tyrsearch.search.candidates import CandidateEvaluator, Levels
from tyrsearch.search.knapsack import knapsack_levels
from tyrsearch.search.samplers import (
    GENERATION,
    ITERATION,
    best_trial,
    iteration_trials,
    make_sampler,
    param_name,
    parse_param,
)
from tyrsearch.search.selection import SelectionPruner
from tyrsearch.space import SearchSpace
from tyrsearch.supernet import Supernet, build_supernet, fingerprint

STARTS = ("knapsack", "centre")


@dataclass(frozen=True)
class SearchConfig:
    target: float  # fraction of the decoder's prunable parameters to remove
    criterion: str = "osscar"
    strategy: str = "evolution"  # evolution, tpe or cmaes
    start: str = "knapsack"  # the first iteration's start candidate: knapsack or centre
    seed: int = 0
    sensitivity_sequences: int = 1  # fitness sequences on which each variant's KL is measured (knapsack)
    batch_size: int = 4
    no_rebuild: bool = False  # a corrupt cached supernet is an error instead of being rebuilt


@dataclass
class SearchResult:
    levels: Levels
    supernet: Supernet
    fitness: float
    iterations: list[dict] = field(default_factory=list)
    times_s: dict[str, float] = field(default_factory=dict)


def params_to_levels(params: dict[str, int], layers: int) -> Levels:
    levels: Levels = [{} for _ in range(layers)]
    for name, level in params.items():
        idx, unit = parse_param(name)
        levels[idx][unit] = int(level)
    return levels


def levels_to_params(levels: Levels) -> dict[str, int]:
    return {param_name(idx, unit): level for idx, units in enumerate(levels) for unit, level in units.items()}


def shapes_of(supernet: Supernet, levels: Levels, dense: list[LayerShape]) -> list[LayerShape]:
    shapes = []
    for idx, units in enumerate(levels):
        shape = dense[idx]
        for unit, level in units.items():
            shape = shape.with_units(unit, supernet.keep(idx, unit, level))
        shapes.append(shape)
    return shapes


def check_reachable(space: SearchSpace, dense: list[LayerShape], dims: allocation.Dims, target: float) -> None:
    """Refuse up front a target that min_keep makes unreachable."""
    floor = []
    for shape in dense:
        for unit, spec in space.units.items():
            shape = shape.with_units(unit, min(spec.min_keep, shape.units(unit)))
        floor.append(shape)
    reachable = allocation.sparsity_of(floor, dense, dims)
    if reachable < target:
        raise UserError(f"target {target} cannot be reached: the space's min_keep allows at most {reachable:.3f} "
                        "sparsity; lower the target or min_keep")


def uniform_centre(dense: list[LayerShape], dims: allocation.Dims, target: float) -> list[LayerShape]:
    """The first iteration's centre: uniform with attention dense, or, where the MLPs alone cannot carry the
    target, uniform over attention and MLP alike."""
    try:
        return allocation.uniform(dense, sparsity=target, dims=dims)
    except UserError:
        return allocation.uniform(dense, sparsity=target, attention_sparsity=target, dims=dims)


class Search:
    """One search of one model: the study, the supernets and the evaluators of its iterations."""

    def __init__(self, *, model: nn.Module, calibration: torch.Tensor, fitness_batches: torch.Tensor,
                 space: SearchSpace, config: SearchConfig, study: optuna.Study, supernet_dir: Path,
                 progress: bool = True):
        self.model, self.calibration, self.space, self.config = model, calibration, space, config
        self.study, self.supernet_dir, self.progress = study, Path(supernet_dir), progress
        self.adapter = adapter_for(model)
        self.dense = self.adapter.shapes(model)
        self.dims = allocation.Dims(hidden=model.config.hidden_size, head_dim=self.adapter.head_dim(model))
        space.check_model(self.dense, self.adapter.unit_types)
        check_reachable(space, self.dense, self.dims, config.target)
        self.seq_len = fitness_batches.shape[1]
        self.stage_sequences = [math.ceil(stage.tokens / self.seq_len) for stage in space.selection]
        if self.stage_sequences[-1] > fitness_batches.shape[0]:
            raise ValueError(f"the last selection stage needs {self.stage_sequences[-1]} fitness sequences")
        self.reference = evaluate.dense_topk(model, fitness_batches[: self.stage_sequences[-1]],
                                             k=space.fitness.top_k, batch_size=config.batch_size, progress=False)
        self.times: dict[str, float] = {"supernet": 0.0, "sensitivity": 0.0, "search": 0.0}

    # -- supernets ------------------------------------------------------------------------------------

    def supernet(self, centre: list[LayerShape], space: SearchSpace) -> Supernet:
        """The supernet around `centre`, from the cache folder when one with the same model, calibration,
        criterion and grid is there and intact; otherwise built and saved."""
        key = json.dumps({"model": self._model_fingerprint(), "calibration": fingerprint([self.calibration]),
                          "criterion": self.config.criterion, "centre": [asdict(s) for s in centre],
                          "units": {u: asdict(s) for u, s in space.units.items()}, "levels": space.levels},
                         sort_keys=True)
        folder = self.supernet_dir / hashlib.sha256(key.encode()).hexdigest()[:16]
        if (folder / "manifest.json").is_file():
            try:
                return Supernet.load(folder)
            except UserError:
                if self.config.no_rebuild:
                    raise
                tqdm.write(f"supernet {folder} is corrupt: rebuilding it", file=sys.stderr)
        tic = time.perf_counter()
        criterion = make_criterion(self.config.criterion, seed=self.config.seed)
        supernet = build_supernet(self.model, criterion, self.calibration, space=space, centre=centre,
                                  batch_size=self.config.batch_size, progress=self.progress)
        supernet.save(folder)
        self.times["supernet"] += time.perf_counter() - tic
        return supernet

    def _model_fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = fingerprint(list(self.model.state_dict().values()))
        return self._fingerprint

    # -- the start candidate --------------------------------------------------------------------------

    def knapsack_start(self, supernet: Supernet) -> Levels:
        """Levels minimising the summed single-layer KL under the exact budget (the Tyr start)."""
        tic = time.perf_counter()
        levels, _ = knapsack_levels(self.model, supernet, self.reference.head(self.config.sensitivity_sequences),
                                    sparsity=self.config.target, dims=self.dims, progress=self.progress)
        self.times["sensitivity"] += time.perf_counter() - tic
        return levels

    # -- the study ------------------------------------------------------------------------------------

    def run(self) -> SearchResult:
        tic = time.perf_counter()
        self._fail_stale_trials()
        centre = uniform_centre(self.dense, self.dims, self.config.target)
        summary, supernet, winner = [], None, None
        for k in range(self.space.iterations):
            space = self.iteration_space(k)
            supernet = self.supernet(centre, space)
            record = self.study.user_attrs.get(f"iteration{k}")
            if record is None:
                zero = [{unit: 0 for unit in units} for units in supernet.grid]
                start = self.knapsack_start(supernet) if k == 0 and self.config.start == "knapsack" else zero
                record = {"grid": supernet.grid, "levels": supernet.levels, "start": levels_to_params(start),
                          "steps": {u: s.step for u, s in space.units.items()}, "cost": self._costs(supernet)}
                self.study.set_user_attr(f"iteration{k}", record)
            elif record["grid"] != supernet.grid:
                raise UserError(f"study {self.study.study_name!r} was searched with another grid in iteration {k}; "
                                "resume with the same model, space, target and calibration, or start a new study")
            self.study.set_user_attr(ITERATION, k)
            evaluator = CandidateEvaluator(model=self.model, supernet=supernet, reference=self.reference,
                                           metric=self.space.fitness.metric, batch_size=self.config.batch_size)
            winner = self._iterate(k, evaluator)
            levels = params_to_levels(winner.params, len(self.dense))
            summary.append({"iteration": k, "steps": record["steps"], "start_fitness": self._start_fitness(k),
                            "fitness": winner.value, "trial": winner.number,
                            "evaluation_seconds": evaluator.seconds,
                            "evaluated_sequences": evaluator.evaluated_sequences})
            centre = shapes_of(supernet, levels, self.dense)
        self.times["search"] = time.perf_counter() - tic - self.times["supernet"] - self.times["sensitivity"]
        return SearchResult(levels=params_to_levels(winner.params, len(self.dense)), supernet=supernet,
                            fitness=winner.value, iterations=summary, times_s=dict(self.times))

    def _costs(self, supernet: Supernet) -> dict[str, list[int]]:
        """Parameters of each searched block at each level: what the sampler keeps constant."""
        costs = {}
        for idx, units in enumerate(supernet.grid):
            for unit, keeps in units.items():
                block = self.dims.attention_params if unit in ATTENTION_UNITS else self.dims.mlp_params
                costs[param_name(idx, unit)] = [block(self.dense[idx].with_units(unit, keep)) for keep in keeps]
        return costs

    def iteration_space(self, k: int) -> SearchSpace:
        """Iteration k's space: every unit type's step halved k times (at least 1 unit)."""
        units = {u: replace(s, step=max(1, s.step >> k)) for u, s in self.space.units.items()}
        return replace(self.space, units=units)

    def _fail_stale_trials(self) -> None:
        """Trials left running by a killed process are failed; their places are redone."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            self.study.tell(trial.number, state=TrialState.FAIL)

    def _start_fitness(self, k: int) -> float:
        trials = [t for t in iteration_trials(self.study, k) if t.system_attrs.get(GENERATION) == 0]
        return trials[0].value if trials else float("nan")

    def _iterate(self, k: int, evaluator: CandidateEvaluator) -> optuna.trial.FrozenTrial:
        generations = self.space.generations
        bar = tqdm(range(generations + 1), desc=f"iteration {k + 1}/{self.space.iterations}",
                   disable=not self.progress, unit="gen")
        for generation in bar:
            size = self.study.sampler.generation_size(self.study, generation)
            if size == 0:
                tqdm.write(f"iteration {k + 1}: every candidate around the parent was tried; moving on",
                           file=sys.stderr)
                break
            done = [t for t in iteration_trials(self.study, k) if t.system_attrs.get(GENERATION) == generation]
            if len(done) < size:  # not finished before a resume
                if generation > 0:  # the parent of this generation: the best so far (elitist)
                    parent = best_trial([t for t in iteration_trials(self.study, k)
                                         if t.system_attrs[GENERATION] < generation])
                    evaluator.set_parent(params_to_levels(parent.params, len(self.dense)))
                self._generation(evaluator, size - len(done))
            best = best_trial(iteration_trials(self.study, k))
            bar.set_postfix(fitness=f"{best.value:.4f}", trials=len(self.study.trials))
        return best_trial(iteration_trials(self.study, k))

    def _generation(self, evaluator: CandidateEvaluator, count: int) -> None:
        """Ask `count` trials (one generation's remaining places) and run them through the stages."""
        alive = [self.study.ask() for _ in range(count)]
        for trial in alive:
            levels = params_to_levels(self._levels(trial), len(self.dense))
            self._describe(trial, evaluator.supernet, levels)
        stages = self.stage_sequences
        for step, sequences in enumerate(stages):
            values = {}
            for trial in alive:
                values[trial.number] = evaluator.fitness(params_to_levels(trial.params, len(self.dense)), sequences)
                trial.report(values[trial.number], step)
            if step + 1 == len(stages):
                for trial in alive:
                    self.study.tell(trial, values[trial.number])
                return
            survivors = []
            for trial in alive:
                if trial.should_prune():
                    self.study.tell(trial, state=TrialState.PRUNED)
                else:
                    survivors.append(trial)
            alive = survivors

    def _levels(self, trial: optuna.Trial) -> dict[str, int]:
        """The trial's levels, suggested over the iteration's space (the sampler chose them)."""
        levels = self.space.levels
        return {name: trial.suggest_int(name, -levels, levels)
                for name in sorted(param_name(i, u) for i in range(len(self.dense)) for u in self.space.units)}

    def _describe(self, trial: optuna.Trial, supernet: Supernet, levels: Levels) -> None:
        """User attrs the dashboard shows: units kept per layer, parameters, sparsity, FLOPs per token."""
        shapes = shapes_of(supernet, levels, self.dense)
        params = sum(map(self.dims.params, shapes))
        attention_flops = sum(2 * self.seq_len * s.q_heads * self.dims.head_dim for s in shapes)  # QK^T, AV (causal)
        trial.set_user_attr("keeps", [[s.q_heads, s.kv_heads, s.intermediate] for s in shapes])
        trial.set_user_attr("params", params)
        trial.set_user_attr("sparsity", allocation.sparsity_of(shapes, self.dense, self.dims))
        trial.set_user_attr("flops_per_token", 2 * params + attention_flops)


def materialize(model: nn.Module, result: SearchResult) -> nn.Module:
    """A copy of the dense `model` cut to the winner (per-layer shapes; save it with save_pruned)."""
    return result.supernet.apply(copy.deepcopy(model), result.levels)


def open_study(*, storage: str, study_name: str, space: SearchSpace, config: SearchConfig,
               resume: bool) -> optuna.Study:
    """The study behind a search: created new, or (resume) loaded and checked to be the same search."""
    sampler = make_sampler(config.strategy, offspring=space.offspring, seed=config.seed)
    pruner = SelectionPruner(survivors=[stage.survivors for stage in space.selection])
    settings = {"target": config.target, "criterion": config.criterion, "strategy": config.strategy,
                "start": config.start, "seed": config.seed, "space": asdict(space)}
    settings = json.loads(json.dumps(settings))  # tuples become lists, as the storage returns them
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner,
                                    direction="minimize", load_if_exists=resume)
    except optuna.exceptions.DuplicatedStudyError:
        raise UserError(f"study {study_name!r} already exists in {storage}: pass --resume to continue it "
                        "or choose another --study") from None
    known = study.user_attrs.get("settings")
    if known is None:
        study.set_user_attr("settings", settings)
    elif known != settings:
        changed = sorted(k for k in settings if settings[k] != known.get(k))
        raise UserError(f"study {study_name!r} was started with other settings ({', '.join(changed)}): "
                        "resume with the same ones or choose another --study")
    return study

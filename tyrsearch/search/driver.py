"""Coarse-to-fine global search (Tyr-the-Pruner) as one Optuna study.

    for each iteration k (the level step halves each time):
        supernet around the centre (uniform at first, then the previous winner), built or reused
        generation 0: the start candidate (knapsack over per-layer sensitivities, or the centre)
        generations 1..G: the sampler plans N candidates as WAITING trials; workers (this process, or
            others on the same storage: see worker.py) evaluate each on the first stage's tokens, the
            SelectionPruner keeps the best for the next stage, ...; the last stage's survivors complete
        winner_k: the best complete trial of the iteration (the parent competes: elitist)

The search plans and waits; it does not know where the candidates are evaluated (a runner hands it the
`work` to do in between). Everything it knows is in the study, so a rerun with the same storage resumes
it: complete generations are kept, trials left running by a killed process are retried.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from torch import nn
from tqdm.auto import tqdm

from tyrsearch import allocation
from tyrsearch.errors import UserError
from tyrsearch.local import make_criterion
from tyrsearch.models import ATTENTION_UNITS, LayerShape, adapter_for
from tyrsearch.search.candidates import Levels
from tyrsearch.search.knapsack import knapsack_levels
from tyrsearch.search.samplers import (
    GENERATION,
    INDEX,
    ITERATION,
    best_trial,
    iteration_trials,
    make_sampler,
    param_name,
)
from tyrsearch.search.selection import SelectionPruner
from tyrsearch.search.storage import load_study
from tyrsearch.search.worker import (
    DONE,
    FIXED,
    Backoff,
    Worker,
    generation_trials,
    params_to_levels,
    reference_for,
    retry,
)
from tyrsearch.space import SearchSpace, parse_space
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
    workers: dict[str, dict] = field(default_factory=dict)  # per evaluating process, where the runner knows


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
        self.stage_sequences = [-(-stage.tokens // self.seq_len) for stage in space.selection]
        self.reference = reference_for(model, fitness_batches, space, batch_size=config.batch_size)
        self.times: dict[str, float] = {"supernet": 0.0, "sensitivity": 0.0, "search": 0.0}

    # -- supernets ------------------------------------------------------------------------------------

    def supernet_folder(self, centre: list[LayerShape], space: SearchSpace) -> Path:
        """Where the supernet around `centre` is cached: named by a hash of the model, calibration,
        criterion and grid, so every search with the same ones reuses it."""
        key = json.dumps({"model": self._model_fingerprint(), "calibration": fingerprint([self.calibration]),
                          "criterion": self.config.criterion, "centre": [asdict(s) for s in centre],
                          "units": {u: asdict(s) for u, s in space.units.items()}, "levels": space.levels},
                         sort_keys=True)
        return self.supernet_dir / hashlib.sha256(key.encode()).hexdigest()[:16]

    def supernet(self, centre: list[LayerShape], space: SearchSpace) -> Supernet:
        """The supernet around `centre`, from the cache folder when it is there and intact; otherwise
        built and saved."""
        folder = self.supernet_folder(centre, space)
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

    def run(self, *, work: Callable[[], bool] | None = None) -> SearchResult:
        """Plan every generation and wait for its candidates to be evaluated. `work` does one piece of
        evaluation and says whether there was any (other processes may do the rest). Without it, an
        in-process Worker evaluates, and this process owns the study: trials left running by a killed
        earlier run are retried at once instead of when their heartbeat goes stale."""
        tic = time.perf_counter()
        self.study.set_user_attr(DONE, False)
        local = None
        if work is None:
            self.retry_running()
            local = Worker(study=self.study, model=self.model, reference=self.reference, space=self.space,
                           batch_size=self.config.batch_size)
            work = local.step
        centre = uniform_centre(self.dense, self.dims, self.config.target)
        summary, supernet, winner = [], None, None
        try:
            for k in range(self.space.iterations):
                space = self.iteration_space(k)
                supernet, folder = self.supernet(centre, space), str(self.supernet_folder(centre, space))
                self._supernet = supernet
                if local is not None:
                    local.evaluation.supernets[folder] = supernet
                record = self.study.user_attrs.get(f"iteration{k}")
                if record is None:
                    zero = [{unit: 0 for unit in units} for units in supernet.grid]
                    start = self.knapsack_start(supernet) if k == 0 and self.config.start == "knapsack" else zero
                    record = {"grid": supernet.grid, "levels": supernet.levels, "start": levels_to_params(start),
                              "steps": {u: s.step for u, s in space.units.items()}, "cost": self._costs(supernet)}
                elif record["grid"] != supernet.grid:
                    raise UserError(f"study {self.study.study_name!r} was searched with another grid in iteration "
                                    f"{k}; resume with the same model, space, target and calibration, or start a "
                                    "new study")
                self.study.set_user_attr(f"iteration{k}", {**record, "supernet": folder})  # workers load it there
                self.study.set_user_attr(ITERATION, k)
                winner = self._iterate(k, work)
                levels = params_to_levels(winner.params, len(self.dense))
                trials = iteration_trials(self.study, k)
                summary.append({"iteration": k, "steps": record["steps"], "start_fitness": self._start_fitness(k),
                                "fitness": winner.value, "trial": winner.number,
                                "evaluation_seconds": sum(t.user_attrs.get("seconds", 0.0) for t in trials)})
                centre = shapes_of(supernet, levels, self.dense)
        finally:
            if local is not None:
                local.close()
        self.study.set_user_attr(DONE, True)
        self.times["search"] = time.perf_counter() - tic - self.times["supernet"] - self.times["sensitivity"]
        return SearchResult(levels=params_to_levels(winner.params, len(self.dense)), supernet=supernet,
                            fitness=winner.value, iterations=summary, times_s=dict(self.times))

    def retry_running(self) -> None:
        """Queue again the candidates of trials left RUNNING (by a killed earlier run whose workers were
        this process's: nobody else will finish them)."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            retry(self.study, trial)

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

    def _start_fitness(self, k: int) -> float:
        trials = [t for t in iteration_trials(self.study, k) if t.system_attrs.get(GENERATION) == 0]
        return trials[0].value if trials else float("nan")

    def _iterate(self, k: int, work: Callable[[], bool]) -> optuna.trial.FrozenTrial:
        bar = tqdm(range(self.space.generations + 1), desc=f"iteration {k + 1}/{self.space.iterations}",
                   disable=not self.progress, unit="gen")
        for generation in bar:
            size = self._plan(k, generation)
            if size == 0:
                tqdm.write(f"iteration {k + 1}: every candidate around the parent was tried; moving on",
                           file=sys.stderr)
                break
            backoff = Backoff()
            while not self._finished(k, generation, size):
                if work():
                    backoff.reset()
                else:
                    optuna.storages.fail_stale_trials(self.study)  # a dead worker's trials are queued again
                    backoff.idle()
            best = best_trial(iteration_trials(self.study, k))
            bar.set_postfix(fitness=f"{best.value:.4f}", trials=len(self.study.trials))
        return best_trial(iteration_trials(self.study, k))

    def _plan(self, k: int, generation: int) -> int:
        """Queue the generation's candidates as WAITING trials with fixed params; returns its size. A plan
        left half-made by a killed process is completed (the sampler proposes the same candidates)."""
        planned = [t for t in self.study.get_trials(deepcopy=False)
                   if t.system_attrs.get(ITERATION) == k and t.system_attrs.get(GENERATION) == generation]
        size = len({t.system_attrs[INDEX] for t in planned})
        if not planned:
            size = self.study.sampler.generation_size(self.study, generation)
            for index in range(size):
                self.study.add_trial(optuna.trial.create_trial(
                    state=TrialState.WAITING, system_attrs={ITERATION: k, GENERATION: generation, INDEX: index}))
            planned = generation_trials(self.study, k, generation)
        for trial in sorted(planned, key=lambda t: t.number):
            if trial.state == TrialState.WAITING and FIXED not in trial.system_attrs:
                params = self.study.sampler.plan(self.study, self.study._storage.get_trial(trial._trial_id))
                self._describe(trial, params)
                self.study._storage.set_trial_system_attr(trial._trial_id, FIXED, params)  # now claimable
        return size

    def _finished(self, k: int, generation: int, size: int) -> bool:
        done = {t.system_attrs[INDEX] for t in generation_trials(self.study, k, generation)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
        return len(done) == size

    def _describe(self, trial: optuna.trial.FrozenTrial, params: dict[str, int]) -> None:
        """User attrs the dashboard shows: where the trial stands, units kept per layer, parameters, sparsity,
        FLOPs per token (the worker adds the stage, its tokens and the seconds spent)."""
        shapes = shapes_of(self._supernet, params_to_levels(params, len(self.dense)), self.dense)
        n_params = sum(map(self.dims.params, shapes))
        attention_flops = sum(2 * self.seq_len * s.q_heads * self.dims.head_dim for s in shapes)  # QK^T, AV (causal)
        attrs = {"iteration": trial.system_attrs[ITERATION], "generation": trial.system_attrs[GENERATION],
                 "keeps": [[s.q_heads, s.kv_heads, s.intermediate] for s in shapes], "params": n_params,
                 "sparsity": allocation.sparsity_of(shapes, self.dense, self.dims),
                 "flops_per_token": 2 * n_params + attention_flops}
        for key, value in attrs.items():
            self.study._storage.set_trial_user_attr(trial._trial_id, key, value)


def materialize(model: nn.Module, result: SearchResult) -> nn.Module:
    """A copy of the dense `model` cut to the winner (per-layer shapes; save it with save_pruned)."""
    return result.supernet.apply(copy.deepcopy(model), result.levels)


def _sampler_and_pruner(space: SearchSpace, strategy: str, seed: int) -> dict:
    return {"sampler": make_sampler(strategy, offspring=space.offspring, seed=seed),
            "pruner": SelectionPruner(survivors=[stage.survivors for stage in space.selection])}


def open_study(*, storage: str | optuna.storages.BaseStorage, study_name: str, space: SearchSpace,
               config: SearchConfig, resume: bool) -> optuna.Study:
    """The study behind a search: created new, or (resume) loaded and checked to be the same search."""
    settings = {"target": config.target, "criterion": config.criterion, "strategy": config.strategy,
                "start": config.start, "seed": config.seed, "space": asdict(space)}
    settings = json.loads(json.dumps(settings))  # tuples become lists, as the storage returns them
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize",
                                    load_if_exists=resume, **_sampler_and_pruner(space, config.strategy, config.seed))
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


def join_study(*, storage: optuna.storages.BaseStorage, study_name: str) -> tuple[optuna.Study, SearchSpace]:
    """A running search's study, opened with the search's own sampler and pruner (what a worker needs)."""
    settings = load_study(storage, study_name).user_attrs.get("settings")
    if settings is None:
        raise UserError(f"study {study_name!r} is not a tyrsearch search; give the --study of a search")
    space = parse_space(settings["space"], source=f"study {study_name!r}")
    study = optuna.load_study(study_name=study_name, storage=storage,
                              **_sampler_and_pruner(space, settings["strategy"], settings["seed"]))
    return study, space

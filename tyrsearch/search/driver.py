"""Coarse-to-fine global search (Tyr-the-Pruner) as one Optuna study.

    for each iteration k (the level step halves each time):
        supernet around the centre (uniform at first, then the previous winner), built or reused
        generation 0: the start candidate (knapsack over per-layer sensitivities, or the centre)
        generations 1..G: the sampler plans N candidates as WAITING trials; workers (this process, or
            others on the same storage: see worker.py) evaluate each on the first stage's tokens, the
            SelectionPruner keeps the best for the next stage, ...; the last stage's survivors complete
        winner_k: the best complete trial of the iteration (the parent competes: elitist), or, where the
            space has a validation stage, the best on held-back tokens of the iteration's few best

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

from tyrsearch import allocation, metrics
from tyrsearch.budget import LATENCY_BAND, Budget, FlopsBudget, LatencyTable, ParamsBudget, limit
from tyrsearch.errors import ParameterError, UserError, mention
from tyrsearch.local import make_criterion
from tyrsearch.models import ATTENTION_UNITS, LayerShape, adapter_for
from tyrsearch.search import study as schema
from tyrsearch.search.candidates import CandidateEvaluator, Levels
from tyrsearch.search.knapsack import knapsack_levels
from tyrsearch.search.samplers import (
    best_trial,
    iteration_trials,
    make_sampler,
    param_name,
)
from tyrsearch.search.selection import SelectionPruner
from tyrsearch.search.storage import load_study
from tyrsearch.search.worker import (
    OBJECTIVES,
    Backoff,
    Worker,
    generation_trials,
    params_to_levels,
    reference_for,
    retry,
)
from tyrsearch.space import SearchSpace, Stage, parse_space
from tyrsearch.supernet import Supernet, build_supernet, fingerprint

STARTS = ("knapsack", "centre")


@dataclass(frozen=True)
class SearchConfig:
    target: float  # fraction of the dense model's budget (decoder parameters by default) to remove
    criterion: str = "osscar"
    strategy: str = "evolution"  # evolution, tpe, cmaes; nsga2 with several objectives
    budget: str = "params"  # what target is a fraction of: params, flops or latency
    objectives: tuple[str, ...] = ("kl",)  # kl alone, or kl and a cost (NSGA-II's Pareto front)
    start: str = "knapsack"  # the first iteration's start candidate: knapsack or centre
    seed: int = 0
    sensitivity_sequences: int = 2  # fitness sequences on which each variant's KL is measured (knapsack)
    batch_size: int = 4
    no_rebuild: bool = False  # a corrupt cached supernet is an error instead of being rebuilt


@dataclass
class Winner:
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


def floor_of(space: SearchSpace, dense: list[LayerShape]) -> list[LayerShape]:
    """The smallest model the space allows: every searched unit type at its min_keep."""
    floor = []
    for shape in dense:
        for unit, spec in space.units.items():
            shape = shape.with_units(unit, min(spec.floor(shape.units(unit)), shape.units(unit)))
        floor.append(shape)
    return floor


def check_reachable(space: SearchSpace, dense: list[LayerShape], budget: Budget, target: float) -> None:
    """Refuse up front a target that min_keep (or the budget's fixed part) makes unreachable."""
    reachable = 1 - budget.total(floor_of(space, dense)) / budget.total(dense)
    if reachable < target:
        wider = "" if any(unit in ATTENTION_UNITS for unit in space.units) else \
            f" (or search attention too, e.g. {mention('space')} llama-heads)"
        raise ParameterError("target", f"{target} cannot be reached: the space's min_keep allows removing at most "
                                       f"{reachable:.3f} of the dense model's {budget.name}; lower the target or "
                                       f"min_keep{wider}")


def uniform_centre(dense: list[LayerShape], dims: allocation.Dims, target: float) -> list[LayerShape]:
    """Uniform parameter sparsity `target`: attention dense, or, where the MLPs alone cannot carry the
    target, uniform over attention and MLP alike. MoE models: the same share of experts in every layer."""
    if any(shape.experts for shape in dense):
        return allocation.uniform_experts(dense, sparsity=target, dims=dims)
    try:
        return allocation.uniform(dense, sparsity=target, dims=dims)
    except allocation.Infeasible:
        return allocation.uniform(dense, sparsity=target, attention_sparsity=target, dims=dims)


def centre_for(budget: Budget, dense: list[LayerShape], dims: allocation.Dims, target: float) -> list[LayerShape]:
    """The first iteration's centre: the uniform allocation that removes `target` of the budget (for
    FLOPs and latency, the least parameter sparsity whose uniform allocation is within the limit)."""
    if isinstance(budget, ParamsBudget):
        return uniform_centre(dense, dims, target)
    most = limit(budget, dense, target)
    low, high = 0.0, 0.999  # parameter sparsity: `high` is within the limit, `low` above it (unless 0 is)
    if budget.total(dense) <= most:
        return list(dense)
    for _ in range(40):
        middle = (low + high) / 2
        try:
            fits = budget.total(uniform_centre(dense, dims, middle)) <= most
        except allocation.Infeasible:
            fits = False  # a uniform allocation this sparse does not exist: treat it as too far
        low, high = (low, middle) if fits else (middle, high)
    try:
        return uniform_centre(dense, dims, high)
    except allocation.Infeasible:
        raise ParameterError("target", f"{target}: no uniform allocation removes that much of the dense model's "
                                       f"{budget.name}; lower it") from None


def parse_objectives(text: str) -> tuple[str, ...]:
    """`kl` or `kl,COST` (COST: latency, params or flops) as a tuple, or a UserError."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    costs = [name for name in OBJECTIVES if name != "kl"]
    if names[:1] != ("kl",) or len(names) > 2 or any(name not in costs for name in names[1:]):
        raise ParameterError("objectives", f"{text!r} is not valid: give kl, or kl and one of {', '.join(costs)} "
                                           "(e.g. kl,latency)")
    return names


def objective_space(space: SearchSpace, objectives: tuple[str, ...]) -> SearchSpace:
    """With several objectives every candidate is evaluated on the last selection stage's tokens (Optuna
    prunes single-objective trials only, and a Pareto front needs every candidate measured alike)."""
    if len(objectives) == 1:
        return space
    return replace(space, selection=(Stage(survivors=space.offspring, tokens=space.selection[-1].tokens),))


class Search:
    """One search of one model: the study, the supernets and the evaluators of its iterations."""

    def __init__(self, *, model: nn.Module, calibration: torch.Tensor, fitness_batches: torch.Tensor,
                 space: SearchSpace, config: SearchConfig, study: optuna.Study, supernet_dir: Path,
                 validation_batches: torch.Tensor | None = None, budget: Budget | None = None,
                 latency: LatencyTable | None = None, progress: bool = True):
        """`validation_batches` (needed when the space has a validation stage) are held back from the
        fitness; `budget` prices candidates (decoder parameters by default); `latency` estimates each
        candidate's latency (needed by a latency objective)."""
        self.model, self.calibration, self.space, self.config = model, calibration, space, config
        self.study, self.supernet_dir, self.progress = study, Path(supernet_dir), progress
        self.adapter = adapter_for(model)
        self.dense = self.adapter.shapes(model)
        self.dims = self.adapter.dims(model)
        self.budget, self.latency = budget or ParamsBudget(dims=self.dims), latency
        if "latency" in config.objectives and latency is None:
            raise ValueError("a latency objective needs a latency table")
        space.check_model(self.dense, self.adapter.unit_types)
        check_reachable(space, self.dense, self.budget, config.target)
        self.limit = limit(self.budget, self.dense, config.target)
        self.flops = FlopsBudget(dims=self.dims, seq_len=fitness_batches.shape[1], vocab=model.config.vocab_size)
        self.seq_len = fitness_batches.shape[1]
        self.stage_sequences = [-(-stage.tokens // self.seq_len) for stage in space.selection]
        self.reference = reference_for(model, fitness_batches, space, batch_size=config.batch_size)
        self.validation = None  # the dense model's top-k on the held-back sequences
        if space.validation is not None and len(config.objectives) == 1:
            sequences = -(-space.validation.tokens // self.seq_len)
            if validation_batches is None or validation_batches.shape[0] < sequences:
                raise ValueError(f"the space's validation needs {sequences} held-back sequences")
            self.validation = metrics.dense_topk(model, validation_batches[:sequences], k=space.fitness.top_k,
                                                  batch_size=config.batch_size, progress=False)
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
                                    budget=self.budget, target=self.config.target, progress=self.progress)
        self.times["sensitivity"] += time.perf_counter() - tic
        return levels

    # -- the study ------------------------------------------------------------------------------------

    def run(self, *, work: Callable[[], bool] | None = None) -> Winner:
        """Plan every generation and wait for its candidates to be evaluated. `work` does one piece of
        evaluation and says whether there was any (other processes may do the rest). Without it, an
        in-process Worker evaluates, and this process owns the study: trials left running by a killed
        earlier run are retried at once instead of when their heartbeat goes stale."""
        tic = time.perf_counter()
        schema.set_done(self.study, False)
        local = None
        if work is None:
            self.retry_running()
            local = Worker(study=self.study, model=self.model, reference=self.reference, space=self.space,
                           batch_size=self.config.batch_size)
            work = local.step
        centre = centre_for(self.budget, self.dense, self.dims, self.config.target)
        summary, supernet, winner = [], None, None
        try:
            for k in range(self.space.iterations):
                space = self.iteration_space(k)
                supernet, folder = self.supernet(centre, space), str(self.supernet_folder(centre, space))
                self._supernet = supernet
                if local is not None:
                    local.evaluation.supernets[folder] = supernet
                record = schema.iteration_record(self.study, k)
                if record is None:
                    zero = [{unit: 0 for unit in units} for units in supernet.grid]
                    start = self.knapsack_start(supernet) if k == 0 and self.config.start == "knapsack" else zero
                    record = schema.IterationRecord(
                        grid=supernet.grid, levels=supernet.levels, start=levels_to_params(start),
                        steps={u: s.step for u, s in space.units.items()}, cost=self._costs(supernet))
                    if not self.budget.exact:
                        record = replace(record, band=self._band(supernet, record))
                elif record.grid != supernet.grid:
                    raise UserError(f"study {self.study.study_name!r} was searched with another grid in iteration "
                                    f"{k}; resume with the same model, space, target and calibration, or start a "
                                    "new study")
                schema.start_iteration(self.study, k, replace(record, supernet=folder))  # workers load it there
                winner = self._iterate(k, work)
                trials = iteration_trials(self.study, k)
                scores = self._validate(k, supernet) if self.validation is not None else {}
                if scores:
                    number = min(scores, key=lambda n: (scores[n], n))
                    winner = next(t for t in trials if t.number == number)
                levels = params_to_levels(winner.params, len(self.dense))
                summary.append({"iteration": k, "steps": record.steps, "start_fitness": self._start_fitness(k),
                                "fitness": winner.values[0], "trial": winner.number,
                                **({"validation": [{"trial": n, "validation": v} for n, v in scores.items()]}
                                   if scores else {}),
                                "evaluation_seconds": sum(t.user_attrs.get("seconds", 0.0) for t in trials)})
                centre = shapes_of(supernet, levels, self.dense)
        finally:
            if local is not None:
                local.close()
        schema.set_done(self.study, True)
        self.times["search"] = time.perf_counter() - tic - self.times["supernet"] - self.times["sensitivity"]
        return Winner(levels=params_to_levels(winner.params, len(self.dense)), supernet=supernet,
                            fitness=winner.values[0], iterations=summary, times_s=dict(self.times))

    def _validate(self, k: int, supernet: Supernet) -> dict[int, float]:
        """Score the iteration's best distinct complete trials (the space's `validation.candidates`, by
        fitness, within the budget) on the held-back sequences: {trial number: score}, best fitness first.
        The scores are kept in the iteration's record (finished trials take no more attrs), so a resumed
        search does not repeat them."""
        complete = [t for t in iteration_trials(self.study, k) if t.state == TrialState.COMPLETE
                    and t.user_attrs.get("within_budget", True)]
        ranked, seen = [], set()
        for trial in sorted(complete, key=lambda t: (t.values[0], t.number)):
            key = tuple(sorted(trial.params.items()))
            if key not in seen:
                seen.add(key)
                ranked.append(trial)
        record = schema.iteration_record(self.study, k)
        known = {int(number): value for number, value in record.validation.items()}
        evaluator = None
        for trial in ranked[:self.space.validation.candidates]:
            if trial.number not in known:
                evaluator = evaluator or CandidateEvaluator(model=self.model, supernet=supernet,
                                                            reference=self.validation, metric=self.space.fitness.metric,
                                                            batch_size=self.config.batch_size)
                known[trial.number] = evaluator.fitness(params_to_levels(trial.params, len(self.dense)),
                                                        evaluator.sequences)
        scores = {t.number: known[t.number] for t in ranked[:self.space.validation.candidates]}
        schema.set_iteration_record(self.study, k, replace(record, validation={str(n): v for n, v in scores.items()}))
        return scores

    def retry_running(self) -> None:
        """Queue again the candidates of trials left RUNNING (by a killed earlier run whose workers were
        this process's: nobody else will finish them)."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            retry(self.study, trial)

    def _costs(self, supernet: Supernet) -> dict[str, list[float]]:
        """The budget's price of each searched block at each level: what the sampler keeps constant (or,
        for latency, within the band)."""
        costs = {}
        for idx, units in enumerate(supernet.grid):
            for unit, keeps in units.items():
                removed = self.budget.layer(self.dense[idx].with_units(unit, 0))  # the layer without that block
                costs[param_name(idx, unit)] = [self.budget.layer(self.dense[idx].with_units(unit, keep)) - removed
                                                for keep in keeps]
        return costs

    def _band(self, supernet: Supernet, record: schema.IterationRecord) -> list[float]:
        """[lowest, highest] summed block prices a candidate may have: (1 - LATENCY_BAND) of the limit up to
        the limit, widened down to the start candidate where that is cheaper."""
        def summed(params: dict[str, int]) -> float:
            return sum(record.cost[name][level + supernet.levels] for name, level in params.items())

        start = record.start
        offset = self.budget.total(shapes_of(supernet, params_to_levels(start, len(self.dense)), self.dense)) \
            - summed(start)  # what the searched blocks' prices leave out (fixed part, unsearched blocks)
        upper = self.limit - offset
        return [min(summed(start), upper - LATENCY_BAND * self.limit), upper]

    def iteration_space(self, k: int) -> SearchSpace:
        """Iteration k's space: every unit type's step halved k times (at least 1 unit)."""
        units = {u: replace(s, step=max(1, s.step >> k)) for u, s in self.space.units.items()}
        return replace(self.space, units=units)

    def _start_fitness(self, k: int) -> float:
        trials = [t for t in iteration_trials(self.study, k) if schema.generation_of(t) == 0]
        return trials[0].values[0] if trials else float("nan")

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
            bar.set_postfix(fitness=f"{best.values[0]:.4f}", trials=len(self.study.trials))
        return best_trial(iteration_trials(self.study, k))

    def _plan(self, k: int, generation: int) -> int:
        """Queue the generation's candidates as WAITING trials with fixed params; returns its size. A plan
        left half-made by a killed process is completed (the sampler proposes the same candidates)."""
        planned = [t for t in self.study.get_trials(deepcopy=False)
                   if schema.iteration_of(t) == k and schema.generation_of(t) == generation]
        size = len({schema.place(t).index for t in planned})
        if not planned:
            size = self.study.sampler.generation_size(self.study, generation)
            for index in range(size):
                schema.add_planned_trial(self.study, schema.Place(k, generation, index))
            planned = generation_trials(self.study, k, generation)
        for trial in sorted(planned, key=lambda t: t.number):
            if trial.state == TrialState.WAITING and schema.planned_params(trial) is None:
                params = self.study.sampler.plan(self.study, schema.fresh(self.study, schema.trial_id(trial)))
                self._describe(trial, params)
                schema.set_planned_params(self.study, trial, params)  # now claimable
        return size

    def _finished(self, k: int, generation: int, size: int) -> bool:
        done = {schema.place(t).index for t in generation_trials(self.study, k, generation)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
        return len(done) == size

    def _describe(self, trial: optuna.trial.FrozenTrial, params: dict[str, int]) -> None:
        """User attrs the dashboard shows: where the trial stands, units kept per layer, parameters, sparsity,
        FLOPs per token (lm_head included), estimated latency where a table is given, and whether it is
        within the budget (the worker adds the stage, its tokens and the seconds spent)."""
        shapes = shapes_of(self._supernet, params_to_levels(params, len(self.dense)), self.dense)
        where = schema.place(trial)
        attrs = {"iteration": where.iteration, "generation": where.generation,
                 "keeps": [[s.q_heads, s.kv_heads, s.intermediate] for s in shapes],
                 "params": sum(map(self.dims.params, shapes)),
                 "sparsity": allocation.sparsity_of(shapes, self.dense, self.dims),
                 "flops_per_token": self.flops.total(shapes),
                 "within_budget": self.budget.total(shapes) <= self.limit + self.budget.resolution}
        if any(s.experts for s in shapes):
            attrs["experts"] = [s.experts for s in shapes]  # routed experts per layer (0: a dense MLP)
        if self.latency is not None:
            attrs["latency_ms"] = self.latency.estimate(shapes)
        for key, value in attrs.items():
            schema.set_trial_user_attr(self.study, trial, key, value)


def materialize(model: nn.Module, result: Winner) -> nn.Module:
    """A copy of the dense `model` cut to the winner (per-layer shapes; save it with save_pruned)."""
    return result.supernet.apply(copy.deepcopy(model), result.levels)


def start_candidate(study: optuna.Study, model: nn.Module, iteration: int = 0) -> nn.Module:
    """A copy of the dense `model` cut to an iteration's start candidate (iteration 0: the knapsack start),
    from the supernet that iteration cached."""
    record = schema.iteration_record(study, iteration)
    levels = params_to_levels(record.start, len(adapter_for(model).shapes(model)))
    return Supernet.load(record.supernet).apply(copy.deepcopy(model), levels)


def _sampler_and_pruner(space: SearchSpace, strategy: str, seed: int) -> dict:
    return {"sampler": make_sampler(strategy, offspring=space.offspring, seed=seed),
            "pruner": SelectionPruner(survivors=[stage.survivors for stage in space.selection])}


def open_study(*, storage: str | optuna.storages.BaseStorage, study_name: str, space: SearchSpace,
               config: SearchConfig, resume: bool) -> optuna.Study:
    """The study behind a search: created new, or (resume) loaded and checked to be the same search."""
    searched = asdict(space)
    if space.validation is None:
        del searched["validation"]  # as studies from before validation existed recorded it: they resume
    settings = {"target": config.target, "criterion": config.criterion, "strategy": config.strategy,
                "start": config.start, "seed": config.seed, "space": searched, "budget": config.budget,
                "objectives": config.objectives}
    settings = json.loads(json.dumps(settings))  # tuples become lists, as the storage returns them
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=resume,
                                    directions=["minimize"] * len(config.objectives),
                                    **_sampler_and_pruner(space, config.strategy, config.seed))
    except optuna.exceptions.DuplicatedStudyError:
        raise ParameterError("study_name", f"{study_name!r} already exists in {storage}: pass {mention('resume')} "
                                           f"to continue it or choose another {mention('study_name')}") from None
    known = schema.settings(study)
    if known is None:
        schema.set_settings(study, settings)
        study.set_metric_names([OBJECTIVES[name] or space.fitness.metric for name in config.objectives])
    elif known != settings:
        changed = sorted(k for k in settings if settings[k] != known.get(k))
        raise ParameterError("study_name", f"{study_name!r} was started with other settings ({', '.join(changed)}): "
                                           f"resume with the same ones or choose another {mention('study_name')}")
    return study


def join_study(*, storage: optuna.storages.BaseStorage, study_name: str) -> tuple[optuna.Study, SearchSpace]:
    """A running search's study, opened with the search's own sampler and pruner (what a worker needs)."""
    settings = schema.settings(load_study(storage, study_name))
    if settings is None:
        raise ParameterError("study_name", f"{study_name!r} is not a tyrsearch search; give the study of a search")
    space = parse_space(settings["space"], source=f"study {study_name!r}")
    study = optuna.load_study(study_name=study_name, storage=storage,
                              **_sampler_and_pruner(space, settings["strategy"], settings["seed"]))
    return study, space

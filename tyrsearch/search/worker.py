"""Evaluation of planned candidates by any number of workers, in one process or many, sharing a study.

The search queues each generation as WAITING trials whose levels are fixed params. A worker claims one
(the storage's WAITING -> RUNNING change is atomic, so no candidate is claimed twice), reports its
fitness on the first selection stage's tokens, and holds it. Once every candidate of the generation has
reported stage s, the SelectionPruner decides for each: its holder prunes it or evaluates stage s + 1;
after the last stage the trial completes. A worker that dies stops beating: Optuna's heartbeat fails its
trials and RetryHeartbeatStaleTrialCallback queues copies (with the stages already reported) that any
worker claims, so no candidate is lost.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import dataclass

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from tyrsearch import metrics
from tyrsearch.metrics import Reference
from tyrsearch.search import study as schema
from tyrsearch.search.candidates import CandidateEvaluator, Levels
from tyrsearch.search.samplers import best_trial, iteration_trials, parse_param
from tyrsearch.space import SearchSpace
from tyrsearch.supernet import Supernet

# what an objective reads from a trial: the fitness itself, or a user attr the search sets when planning
OBJECTIVES = {"kl": None, "latency": "latency_ms", "params": "params", "flops": "flops_per_token"}


def worker_name() -> str:
    """host:pid, how a trial names the process that evaluated it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def params_to_levels(params: dict[str, int], layers: int) -> Levels:
    levels: Levels = [{} for _ in range(layers)]
    for name, level in params.items():
        idx, unit = parse_param(name)
        levels[idx][unit] = int(level)
    return levels


def reference_for(model: nn.Module, fitness_batches: torch.Tensor, space: SearchSpace, *,
                  batch_size: int) -> Reference:
    """The dense model's top-k on as many fitness sequences as the last selection stage needs (computed
    the same way by every worker)."""
    sequences = math.ceil(space.selection[-1].tokens / fitness_batches.shape[1])
    if sequences > fitness_batches.shape[0]:
        raise ValueError(f"the last selection stage needs {sequences} fitness sequences")
    return metrics.dense_topk(model, fitness_batches[:sequences], k=space.fitness.top_k, batch_size=batch_size,
                               progress=False)


def generation_trials(study: optuna.Study, iteration: int, generation: int) -> list[FrozenTrial]:
    """The generation's trials that count (not failed), by number."""
    return [t for t in iteration_trials(study, iteration) if schema.generation_of(t) == generation]


def claim(study: optuna.Study, iteration: int, *, heartbeat: Heartbeat | None = None) -> FrozenTrial | None:
    """Take one planned WAITING trial of the iteration (atomic in the storage; None if there is none).
    Its heartbeat starts before the claim: a worker killed right after claiming must leave a trial whose
    heartbeat goes stale, not a RUNNING trial without one, which Optuna never fails."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if schema.iteration_of(trial) != iteration or schema.planned_params(trial) is None:
            continue  # another iteration's, or still being planned
        if heartbeat:
            heartbeat.add(schema.trial_id(trial))
        try:
            if schema.claim(study, trial):
                return trial
        except UpdateFinishedTrialError:
            pass
        if heartbeat:
            heartbeat.discard(schema.trial_id(trial))  # another worker's: it beats for it
    return None


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Fail a trial that nobody runs any more and queue the same candidate again, keeping the stages it
    reported (what the heartbeat does for a dead worker's trials, done at once)."""
    try:
        if not schema.fail(study, trial):
            return
    except UpdateFinishedTrialError:
        return
    stale = schema.fresh(study, schema.trial_id(trial))
    RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, stale)


class Backoff:
    """Sleeps between polls that found nothing to do, from `first` seconds doubling up to `most`; work
    resets it. Polling the study flat out would take a good share of a core from the workers computing."""

    def __init__(self, *, first: float = 0.02, most: float = 0.25):
        self.first, self.most, self.delay = first, most, first

    def idle(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.most, 2 * self.delay)

    def reset(self) -> None:
        self.delay = self.first


class Heartbeat:
    """Records the heartbeat of every trial a worker holds, every `interval` seconds, in one thread."""

    def __init__(self, storage: optuna.storages.BaseStorage, interval: float):
        self.storage, self.interval, self.ids = storage, interval, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tyrsearch-heartbeat", daemon=True)
        self._thread.start()

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)
        self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        self.ids.discard(trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in list(self.ids):
                self.storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Task:
    """One selection stage of one planned candidate, ready to evaluate anywhere (plain data: a Ray task
    carries it to another process)."""
    trial_id: int
    iteration: int
    generation: int
    stage: int
    sequences: int  # fitness sequences of this stage
    params: dict[str, int]  # the candidate's levels by param name
    parent: dict[str, int] | None  # the generation's parent (None in generation 0): its hidden states are reused
    supernet: str  # folder of the iteration's supernet


class Dispatcher:
    """The study side of evaluation: claims planned trials, holds them through the selection stages,
    prunes them (SelectionPruner) or hands out their next stage once their generation has reported the
    last one, and records results. It never evaluates; `next()` gives a Task, `record()` takes its value."""

    def __init__(self, *, study: optuna.Study, space: SearchSpace, seq_len: int):
        self.study = study
        self.stage_sequences = [math.ceil(stage.tokens / seq_len) for stage in space.selection]
        self.survivors = [stage.survivors for stage in space.selection]
        self.tokens_per_sequence = seq_len
        self.objectives = (schema.settings(study) or {}).get("objectives", ["kl"])
        self.held: set[int] = set()  # trial ids claimed here and not finished
        self.in_flight: set[int] = set()  # held trials whose Task is out being evaluated
        self._parents: dict[tuple[int, int], dict[str, int] | None] = {}
        storage, interval = schema.heartbeat_storage(study)
        self.heartbeat = Heartbeat(storage, interval) if interval else None

    def next(self) -> Task | None:
        """A claimed candidate's first stage, or a held one's next stage (pruning those that selection
        drops on the way). None: nothing to evaluate now."""
        iteration = schema.current_iteration(self.study)
        record = None if iteration is None else schema.iteration_record(self.study, iteration)
        if record is not None and record.supernet is not None:
            trial = claim(self.study, iteration, heartbeat=self.heartbeat)  # new ones first: a held one waits anyway
            if trial is not None:
                self.held.add(schema.trial_id(trial))
                return self._task(schema.trial_id(trial))
        for trial_id in sorted(self.held - self.in_flight):
            task = self._task(trial_id)
            if task is not None:
                return task
        return None

    def record(self, task: Task, value: float, seconds: float, *, worker: str) -> None:
        """Report the task's fitness at its stage (evaluated by `worker`, host:pid); the last stage
        completes the trial."""
        self.in_flight.discard(task.trial_id)
        trial = optuna.Trial(self.study, task.trial_id)
        spent = self._frozen(task.trial_id).user_attrs.get("seconds", 0.0)
        trial.set_user_attr("seconds", spent + seconds)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("stage", task.stage)
        trial.set_user_attr("tokens", task.sequences * self.tokens_per_sequence)
        if len(self.objectives) == 1:  # Optuna prunes (selects) single-objective trials only
            trial.report(value, task.stage)
        if task.stage + 1 == len(self.stage_sequences):
            self._complete(trial, value)

    def abandon(self, task: Task) -> None:
        """The task's evaluation failed: fail the trial and queue the candidate again (stages kept)."""
        self.in_flight.discard(task.trial_id)
        self._release(task.trial_id)
        retry(self.study, self._frozen(task.trial_id))

    def close(self) -> None:
        if self.heartbeat:
            self.heartbeat.close()

    def _frozen(self, trial_id: int) -> FrozenTrial:
        return schema.fresh(self.study, trial_id)

    def _task(self, trial_id: int) -> Task | None:
        frozen = self._frozen(trial_id)
        iteration, generation = schema.iteration_of(frozen), schema.generation_of(frozen)
        stage = max(frozen.intermediate_values, default=-1) + 1  # the next stage to evaluate
        if stage > 0 and not self._stage_done(iteration, generation, stage - 1):
            return None  # the generation's other candidates have not all reported yet
        trial = optuna.Trial(self.study, trial_id)
        if stage == len(self.stage_sequences):  # a copy of a trial whose worker died between its last report
            self._complete(trial, frozen.intermediate_values[stage - 1])  # and completing it
            return None
        # the trial's own iteration, which need not be the current one: a resumed search walks its finished
        # iterations again while this worker still holds trials of the last
        record = schema.iteration_record(self.study, iteration)
        params = {name: trial.suggest_int(name, -record.levels, record.levels)
                  for name in sorted(schema.planned_params(frozen))}
        if stage > 0 and trial.should_prune():
            self._finish(trial, state=TrialState.PRUNED)
            return None
        self.in_flight.add(trial_id)
        return Task(trial_id=trial_id, iteration=iteration, generation=generation, stage=stage,
                    sequences=self.stage_sequences[stage], params=params,
                    parent=self._parent(iteration, generation), supernet=record.supernet)

    def _complete(self, trial: optuna.Trial, value: float) -> None:
        attrs = self._frozen(schema.trial_id(trial)).user_attrs
        self._finish(trial, values=[value, *(attrs[OBJECTIVES[name]] for name in self.objectives[1:])])

    def _finish(self, trial: optuna.Trial, **outcome) -> None:
        self.study.tell(trial, **outcome)
        self._release(schema.trial_id(trial))

    def _release(self, trial_id: int) -> None:
        self.held.discard(trial_id)
        if self.heartbeat:
            self.heartbeat.discard(trial_id)

    def _stage_done(self, iteration: int, generation: int, stage: int) -> bool:
        """Has every candidate of the generation that selection lets reach `stage` reported it?"""
        peers = generation_trials(self.study, iteration, generation)
        size = len({schema.place(t).index for t in peers})
        expected = size if stage == 0 else min(size, self.survivors[stage])
        return sum(stage in t.intermediate_values for t in peers) >= expected

    def _parent(self, iteration: int, generation: int) -> dict[str, int] | None:
        """The generation's parent: the best trial of the iteration's earlier generations (fixed once the
        generation is planned, so computed once)."""
        if generation == 0:
            return None
        if (iteration, generation) not in self._parents:
            parent = best_trial([t for t in iteration_trials(self.study, iteration)
                                 if schema.generation_of(t) < generation])
            self._parents = {(iteration, generation): parent.params}
        return self._parents[(iteration, generation)]


class EvaluationModels:
    """The model side of evaluation: the dense model and reference, each iteration's supernet loaded once
    (by folder), and the parent's hidden states cached once per generation."""

    def __init__(self, *, model: nn.Module, reference: Reference, space: SearchSpace, batch_size: int = 4):
        self.model, self.reference, self.space, self.batch_size = model, reference, space, batch_size
        self.supernets: dict[str, Supernet] = {}  # by folder
        self.loads = 0  # supernets loaded from disk here
        self._evaluator: tuple[str, CandidateEvaluator] | None = None  # (supernet folder, evaluator)
        self._parent: tuple[int, int] | None = None  # (iteration, generation) the parent cache is for

    @torch.inference_mode()
    def __call__(self, task: Task) -> float:
        evaluator = self.evaluator(task.supernet)
        layers = len(evaluator.supernet.grid)
        if task.parent is not None and self._parent != (task.iteration, task.generation):
            evaluator.set_parent(params_to_levels(task.parent, layers))
            self._parent = (task.iteration, task.generation)
        return evaluator.fitness(params_to_levels(task.params, layers), task.sequences)

    def evaluator(self, folder: str) -> CandidateEvaluator:
        if self._evaluator is None or self._evaluator[0] != folder:
            if folder not in self.supernets:
                self.supernets[folder] = Supernet.load(folder)
                self.loads += 1
            self._evaluator = (folder, CandidateEvaluator(
                model=self.model, supernet=self.supernets[folder], reference=self.reference,
                metric=self.space.fitness.metric, batch_size=self.batch_size))
            self._parent = None
        return self._evaluator[1]


class Worker:
    """One evaluating worker in one process: a Dispatcher and an Evaluation. `step()` does one piece of
    work; the caller loops."""

    def __init__(self, *, study: optuna.Study, model: nn.Module, reference: Reference, space: SearchSpace,
                 batch_size: int = 4):
        self.dispatcher = Dispatcher(study=study, space=space, seq_len=reference.batches.shape[1])
        self.evaluation = EvaluationModels(model=model, reference=reference, space=space, batch_size=batch_size)

    def step(self) -> bool:
        """Evaluate one stage of one candidate. False: nothing to do now."""
        task = self.dispatcher.next()
        if task is None:
            return False
        tic = time.perf_counter()
        value = self.evaluation(task)
        self.dispatcher.record(task, value, time.perf_counter() - tic, worker=worker_name())
        return True

    def close(self) -> None:
        self.dispatcher.close()

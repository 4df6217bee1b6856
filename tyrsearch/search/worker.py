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
import threading
import time

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from tyrsearch import evaluate
from tyrsearch.evaluate import Reference
from tyrsearch.search.candidates import CandidateEvaluator, Levels
from tyrsearch.search.samplers import GENERATION, INDEX, ITERATION, best_trial, iteration_trials, parse_param
from tyrsearch.space import SearchSpace
from tyrsearch.supernet import Supernet

FIXED = "fixed_params"  # where Optuna keeps an enqueued trial's params (Study.enqueue_trial)
DONE = "tyr:done"  # study user attr: the search has finished; workers leave


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
    return evaluate.dense_topk(model, fitness_batches[:sequences], k=space.fitness.top_k, batch_size=batch_size,
                               progress=False)


def generation_trials(study: optuna.Study, iteration: int, generation: int) -> list[FrozenTrial]:
    """The generation's trials that count (not failed), by number."""
    return [t for t in iteration_trials(study, iteration) if t.system_attrs[GENERATION] == generation]


def claim(study: optuna.Study, iteration: int) -> FrozenTrial | None:
    """Take one planned WAITING trial of the iteration (atomic in the storage; None if there is none)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if trial.system_attrs.get(ITERATION) != iteration or FIXED not in trial.system_attrs:
            continue  # another iteration's, or still being planned
        try:
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                return trial
        except UpdateFinishedTrialError:
            continue
    return None


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Fail a trial that nobody runs any more and queue the same candidate again, keeping the stages it
    reported (what the heartbeat does for a dead worker's trials, done at once)."""
    try:
        if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return
    except UpdateFinishedTrialError:
        return
    RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, study._storage.get_trial(trial._trial_id))


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

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in list(self.ids):
                self.storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """One evaluating worker: claims planned trials of the study's current iteration and takes each
    through the selection stages. `step()` does one piece of work; the caller loops."""

    def __init__(self, *, study: optuna.Study, model: nn.Module, reference: Reference, space: SearchSpace,
                 batch_size: int = 4):
        self.study, self.model, self.reference, self.space, self.batch_size = study, model, reference, space, batch_size
        seq_len = reference.batches.shape[1]
        self.stage_sequences = [math.ceil(stage.tokens / seq_len) for stage in space.selection]
        self.survivors = [stage.survivors for stage in space.selection]
        self.held: set[int] = set()  # trial ids this worker has claimed and not finished
        self.supernets: dict[str, Supernet] = {}  # by folder: loaded once per worker
        self._evaluator: tuple[int, CandidateEvaluator] | None = None  # (iteration, evaluator)
        self._parent: tuple[int, int] | None = None  # (iteration, generation) the parent cache is for
        interval = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
        self.heartbeat = Heartbeat(study._storage, interval) if interval else None

    def step(self) -> bool:
        """Claim and start a candidate, or take a held one a stage further. False: nothing to do now."""
        iteration = self.study.user_attrs.get(ITERATION)
        record = self.study.user_attrs.get(f"iteration{iteration}")
        if record is None or "supernet" not in record:
            return False
        trial = claim(self.study, iteration)
        if trial is not None:
            self.held.add(trial._trial_id)
            if self.heartbeat:
                self.heartbeat.add(trial._trial_id)
            return self._advance(trial._trial_id, record)
        return any(self._advance(trial_id, record) for trial_id in sorted(self.held))

    def close(self) -> None:
        if self.heartbeat:
            self.heartbeat.close()

    def evaluator(self, iteration: int, record: dict) -> CandidateEvaluator:
        if self._evaluator is None or self._evaluator[0] != iteration:
            folder = record["supernet"]
            if folder not in self.supernets:
                self.supernets[folder] = Supernet.load(folder)
            self._evaluator = (iteration, CandidateEvaluator(
                model=self.model, supernet=self.supernets[folder], reference=self.reference,
                metric=self.space.fitness.metric, batch_size=self.batch_size))
            self._parent = None
        return self._evaluator[1]

    def _advance(self, trial_id: int, record: dict) -> bool:
        frozen = self.study._storage.get_trial(trial_id)
        iteration, generation = frozen.system_attrs[ITERATION], frozen.system_attrs[GENERATION]
        step = max(frozen.intermediate_values, default=-1) + 1  # the next stage to evaluate
        if step > 0 and not self._stage_done(iteration, generation, step - 1):
            return False  # the generation's other candidates have not all reported yet
        trial = optuna.Trial(self.study, trial_id)
        levels = {name: trial.suggest_int(name, -record["levels"], record["levels"])
                  for name in sorted(frozen.system_attrs[FIXED])}
        if step > 0 and trial.should_prune():
            self._finish(trial, state=TrialState.PRUNED)
            return True
        evaluator = self.evaluator(iteration, record)
        self._set_parent(evaluator, iteration, generation)
        tic = time.perf_counter()
        value = evaluator.fitness(params_to_levels(levels, len(evaluator.supernet.grid)), self.stage_sequences[step])
        seconds = frozen.user_attrs.get("seconds", 0.0) + time.perf_counter() - tic
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("stage", step)
        trial.set_user_attr("tokens", self.stage_sequences[step] * self.reference.batches.shape[1])
        trial.report(value, step)
        if step + 1 == len(self.stage_sequences):
            self._finish(trial, values=value)
        return True

    def _finish(self, trial: optuna.Trial, **outcome) -> None:
        self.study.tell(trial, **outcome)
        self.held.discard(trial._trial_id)
        if self.heartbeat:
            self.heartbeat.ids.discard(trial._trial_id)

    def _stage_done(self, iteration: int, generation: int, step: int) -> bool:
        """Has every candidate of the generation that selection lets reach `step` reported it?"""
        peers = generation_trials(self.study, iteration, generation)
        size = len({t.system_attrs[INDEX] for t in peers})
        expected = size if step == 0 else min(size, self.survivors[step])
        return sum(step in t.intermediate_values for t in peers) >= expected

    @torch.inference_mode()
    def _set_parent(self, evaluator: CandidateEvaluator, iteration: int, generation: int) -> None:
        """Cache the hidden states of the generation's parent (the best earlier trial), once per generation."""
        if generation == 0 or self._parent == (iteration, generation):
            return
        parent = best_trial([t for t in iteration_trials(self.study, iteration)
                             if t.system_attrs[GENERATION] < generation])
        evaluator.set_parent(params_to_levels(parent.params, len(evaluator.supernet.grid)))
        self._parent = (iteration, generation)

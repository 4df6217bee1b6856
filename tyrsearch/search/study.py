"""The study's schema: every key tyrsearch keeps in an Optuna study and its trials is read and written here,
and so is every private Optuna call the search makes (each says why the public API does not do it).

Study user attrs   settings        the search's settings (a resume must repeat them)
                   tyr:job         what a worker needs to rebuild the inputs (`search.job.Job`)
                   tyr:iteration   the iteration being searched
                   iteration{k}    iteration k's record (`IterationRecord`)
                   tyr:done        the search has finished: workers leave
                   tyr:result      the finished search's result.json (`tyrsearch report` renders it)
Trial system attrs tyr:iteration, tyr:generation, tyr:index: the trial's place in the plan (`Place`)
                   fixed_params    Optuna's own key for the params of an enqueued trial: the planned levels
Trial user attrs   what the dashboard shows (keeps, params, sparsity, flops_per_token, within_budget, ...) and
                   what a worker adds (seconds, worker, stage, tokens)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

SETTINGS = "settings"
JOB = "tyr:job"
CURRENT = "tyr:iteration"
DONE = "tyr:done"
RESULT = "tyr:result"
ITERATION = "tyr:iteration"
GENERATION = "tyr:generation"
INDEX = "tyr:index"
HEAL_SELECT = "tyr:heal_select"  # a healing-aware selection's trial: the number of the candidate it healed
FIXED = "fixed_params"  # Study.enqueue_trial's key: a WAITING trial with it has its params decided


@dataclass(frozen=True)
class IterationRecord:
    """One iteration of the coarse-to-fine search, as every process sees it."""

    grid: list[dict[str, list[int]]]  # per layer, per unit type: units kept at each level -levels..levels
    levels: int
    start: dict[str, int]  # the iteration's start candidate (param name -> level)
    steps: dict[str, int]  # units per level step, per unit type
    cost: dict[str, list[float]]  # the budget's price of each param at each level
    band: list[float] | None = None  # latency budgets: [lowest, highest] summed price a candidate may have
    supernet: str | None = None  # the folder workers load the iteration's supernet from
    validation: dict[str, float] = field(default_factory=dict)  # trial number -> held-back score

    def to_attr(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and (k != "validation" or v)}

    @classmethod
    def from_attr(cls, attr: dict) -> IterationRecord:
        return cls(**attr)


@dataclass(frozen=True)
class Place:
    """Where a planned trial stands: iteration, generation and index within the generation."""

    iteration: int
    generation: int
    index: int

    def to_attrs(self) -> dict[str, int]:
        return {ITERATION: self.iteration, GENERATION: self.generation, INDEX: self.index}


# -- study attrs -------------------------------------------------------------------------------------------


def settings(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(SETTINGS)


def set_settings(study: optuna.Study, value: dict) -> None:
    study.set_user_attr(SETTINGS, value)


def job(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(JOB)


def set_job(study: optuna.Study, value: dict) -> None:
    study.set_user_attr(JOB, value)


def current_iteration(study: optuna.Study) -> int | None:
    return study.user_attrs.get(CURRENT)


def iteration_record(study: optuna.Study, k: int) -> IterationRecord | None:
    attr = study.user_attrs.get(f"iteration{k}")
    return None if attr is None else IterationRecord.from_attr(attr)


def start_iteration(study: optuna.Study, k: int, record: IterationRecord) -> None:
    """Iteration k's record written, then k made the current iteration (workers read them in that order)."""
    study.set_user_attr(f"iteration{k}", record.to_attr())
    study.set_user_attr(CURRENT, k)


def set_iteration_record(study: optuna.Study, k: int, record: IterationRecord) -> None:
    study.set_user_attr(f"iteration{k}", record.to_attr())


def is_done(study: optuna.Study) -> bool:
    return bool(study.user_attrs.get(DONE))


def set_done(study: optuna.Study, done: bool) -> None:
    study.set_user_attr(DONE, done)


def result(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(RESULT)


def set_result(study: optuna.Study, value: dict) -> None:
    study.set_user_attr(RESULT, value)


# -- trials ------------------------------------------------------------------------------------------------


def place(trial: FrozenTrial) -> Place | None:
    attrs = trial.system_attrs
    return Place(attrs[ITERATION], attrs[GENERATION], attrs[INDEX]) if ITERATION in attrs else None


def iteration_of(trial: FrozenTrial) -> int | None:
    return trial.system_attrs.get(ITERATION)


def generation_of(trial: FrozenTrial) -> int | None:
    return trial.system_attrs.get(GENERATION)


def planned_params(trial: FrozenTrial) -> dict[str, int] | None:
    """The levels a planned trial will evaluate (None while the sampler has not proposed them)."""
    return trial.system_attrs.get(FIXED)


def add_planned_trial(study: optuna.Study, where: Place) -> None:
    """A WAITING trial at `where`, its params still to be decided (`set_planned_params`)."""
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=where.to_attrs()))


# Private Optuna calls. The search plans a whole generation as WAITING trials before anyone evaluates them,
# and workers claim a particular trial; Optuna's public API only enqueues params at creation
# (`Study.enqueue_trial`) and only hands out the oldest WAITING trial (`Study.ask`), so these go to the
# storage, the same calls `Study.ask` and `enqueue_trial` make inside Optuna.


def trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The storage's id of a trial (`number` counts within the study; storage calls take the id)."""
    return trial._trial_id


def fresh(study: optuna.Study, trial_id: int) -> FrozenTrial:
    """The trial as the storage has it now (a `Study.trials` list is a snapshot)."""
    return study._storage.get_trial(trial_id)


def heartbeat_storage(study: optuna.Study) -> tuple[optuna.storages.BaseStorage, float | None]:
    """The storage and its heartbeat interval (None: no heartbeats), for a worker's heartbeat thread:
    Optuna beats only inside `Study.optimize`, which the search does not run."""
    interval = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
    return study._storage, interval


def set_planned_params(study: optuna.Study, trial: FrozenTrial, params: dict[str, int]) -> None:
    """Decide a planned trial's params (Optuna's `fixed_params`): from now on a worker may claim it."""
    study._storage.set_trial_system_attr(trial._trial_id, FIXED, params)


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: object) -> None:
    """A user attr of a trial that is not running here (a planned one): `Trial.set_user_attr` needs the
    running trial's `Trial` object."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def claim(study: optuna.Study, trial: FrozenTrial) -> bool:
    """WAITING -> RUNNING for this worker; False when another worker claimed it first (the storage's state
    change is atomic, which is how `Study.ask` claims too)."""
    return study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING)


def fail(study: optuna.Study, trial: FrozenTrial) -> bool:
    """RUNNING -> FAIL of a trial this process holds; False when it had already finished."""
    return study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


# -- healing-aware selection ---------------------------------------------------------------------------------


def healed_candidate(trial: FrozenTrial) -> int | None:
    """The number of the search trial that a healing-aware selection trial healed (None: a search trial)."""
    return trial.system_attrs.get(HEAL_SELECT)


def add_healed(study: optuna.Study, candidate: FrozenTrial, value: float, attrs: dict) -> None:
    """A candidate's score after its brief heal, as a finished trial of the study: the dashboard shows it
    beside the search's, and a rerun finds it instead of healing the candidate again."""
    study.add_trial(optuna.trial.create_trial(params=candidate.params, distributions=candidate.distributions,
                                              value=value, user_attrs=attrs,
                                              system_attrs={HEAL_SELECT: candidate.number}))

"""Multi-step selection as Optuna pruning: a generation's candidates report their fitness on few tokens
(step 0), only the best go on to more tokens (step 1), and so on; the rest are pruned trials. The
dashboard shows every stage as an intermediate value."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.pruners import BasePruner
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from tyrsearch.search import study as schema


class SelectionPruner(BasePruner):
    """`survivors[s]` candidates of a generation are evaluated at step s; a trial is pruned after step
    s unless it ranks among the best survivors[s + 1] of its generation at that step (ties: lower number).
    Decide only once the whole generation has reported step s."""

    def __init__(self, *, survivors: Sequence[int]):
        self.survivors = tuple(survivors)

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step + 1 >= len(self.survivors):
            return False
        peers = [t for t in study.get_trials(deepcopy=False)
                 if t.state != TrialState.FAIL and step in t.intermediate_values
                 and schema.iteration_of(t) == schema.iteration_of(trial)
                 and schema.generation_of(t) == schema.generation_of(trial)]
        ranked = sorted(peers, key=lambda t: (t.intermediate_values[step], t.number))
        return [t.number for t in ranked].index(trial.number) >= self.survivors[step + 1]

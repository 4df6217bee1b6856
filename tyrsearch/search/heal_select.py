"""Healing-aware final selection: DarwinLM's training-aware selection at a CPU-sized cost.

The search ranks candidates as they are, one-shot; the model a user keeps is the healed one, and the
candidate that heals best need not be the one that starts best. So the K best distinct candidates of a
finished search (any iteration, within the budget) are each distilled from the dense model for a few
steps on the healing text and scored by their KL to it on held-back calibration tokens (the space's
validation sequences, else the fitness ones); the best healed one becomes the winner, to be healed fully.

Each score is a finished trial of the search's study (`tyr:heal_select` names the candidate it healed), so
the dashboard shows them beside the search's trials and a rerun does not heal a candidate twice; a brief
heal keeps checkpoints too, so one interrupted midway resumes. The search process runs them itself, with
any runner: they are a handful of training runs, not thousands of forwards.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from tyrsearch import metrics
from tyrsearch.healing import HEAL_BATCH, DistillConfig, Heal, distill
from tyrsearch.search import study as schema
from tyrsearch.search.driver import Search, Winner
from tyrsearch.search.worker import params_to_levels
from tyrsearch.supernet import Supernet


def ranked_candidates(search: Search, count: int) -> list[FrozenTrial]:
    """The `count` best complete search trials of all iterations within the budget, by fitness, one per
    distinct shape (a candidate two iterations both reached counts once)."""
    complete = [t for t in search.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if schema.iteration_of(t) is not None and t.user_attrs.get("within_budget", True)]
    ranked, seen = [], set()
    for trial in sorted(complete, key=lambda t: (t.values[0], t.number)):
        shape = json.dumps(trial.user_attrs["keeps"])
        if shape not in seen:
            seen.add(shape)
            ranked.append(trial)
    return ranked[:count]


def candidate_model(search: Search, trial: FrozenTrial) -> nn.Module:
    """The trial's candidate cut from the dense model by its iteration's supernet, in float32 (the master
    weights a heal trains)."""
    supernet = Supernet.load(schema.iteration_record(search.study, schema.iteration_of(trial)).supernet)
    return supernet.apply(copy.deepcopy(search.model), params_to_levels(trial.params, len(search.dense))).float()


def select_healed(search: Search, found: Winner, heal: Heal, windows: torch.Tensor, checkpoints: Path, *,
                  progress: bool = True) -> tuple[Winner, list[dict]]:
    """The winner among `heal.candidates` candidates briefly healed (`heal.select_steps` steps on token
    windows [n, L]) and a row per candidate: its trial, iteration, search fitness and healed KL."""
    dense = next(search.model.parameters())
    reference = search.validation if search.validation is not None else search.reference
    config = DistillConfig(steps=heal.select_steps, batch_size=HEAL_BATCH, lr=heal.lr,
                           warmup=min(20, heal.select_steps // 10), train=heal.train, method=heal.method)
    scored = {schema.healed_candidate(t): t.values[0]
              for t in search.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if schema.healed_candidate(t) is not None}
    rows = []
    for trial in ranked_candidates(search, heal.candidates):
        if trial.number not in scored:
            model = candidate_model(search, trial)
            folder = checkpoints / f"trial-{trial.number}"
            distill(search.model, model, windows, folder, config=config, progress=progress, device=dense.device,
                    autocast=dense.dtype)
            scored[trial.number] = metrics.kl_divergence(model, reference, batch_size=search.config.batch_size)
            schema.add_healed(search.study, trial, scored[trial.number],
                              {"healed_trial": trial.number, "iteration": schema.iteration_of(trial),
                               "fitness": trial.values[0], "heal_steps": config.steps,
                               "keeps": trial.user_attrs["keeps"]})
            shutil.rmtree(folder)
        rows.append({"trial": trial.number, "iteration": schema.iteration_of(trial), "fitness": trial.values[0],
                     "healed_kl": scored[trial.number]})
    best = min(rows, key=lambda row: (row["healed_kl"], row["fitness"]))
    trial = next(t for t in search.study.get_trials(deepcopy=False) if t.number == best["trial"])
    supernet = Supernet.load(schema.iteration_record(search.study, best["iteration"]).supernet)
    winner = Winner(levels=params_to_levels(trial.params, len(search.dense)), supernet=supernet,
                    fitness=trial.values[0], iterations=found.iterations, times_s=found.times_s,
                    workers=found.workers)
    return winner, rows

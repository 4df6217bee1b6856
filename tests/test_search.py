"""The global search on tiny models: cheap candidate evaluation equals a full forward, offspring keep the
budget, multi-step selection prunes the right trials, and a search is deterministic and resumable."""

import copy
import random
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch

from tests.conftest import SEARCH_SPACE, random_batches, tiny_gemma3, tiny_llama
from tyrsearch import allocation, metrics
from tyrsearch.errors import UserError
from tyrsearch.local import make_criterion
from tyrsearch.models import MLP, Q_HEADS, adapter_for
from tyrsearch.search import driver
from tyrsearch.search import study as schema
from tyrsearch.search.candidates import CandidateEvaluator
from tyrsearch.search.driver import Search, SearchConfig, open_study
from tyrsearch.search.samplers import EvolutionSampler, _Grid, param_name, repair
from tyrsearch.search.selection import SelectionPruner
from tyrsearch.search.study import GENERATION, ITERATION
from tyrsearch.space import SearchSpace, UnitSpace, Validation
from tyrsearch.supernet import Supernet, build_supernet

optuna.logging.set_verbosity(optuna.logging.WARNING)

def _random_levels(net, rng: random.Random):
    return [{unit: rng.randint(-net.levels, net.levels) for unit in units} for units in net.grid]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma3])
def test_cheap_evaluation_equals_the_full_forward_of_the_assembled_model(factory):
    model = factory()
    shapes = adapter_for(model).shapes(model)
    centre = [s.with_units(Q_HEADS, max(1, s.q_per_kv - 1)).with_units(MLP, 40) for s in shapes]
    net = build_supernet(model, make_criterion("osscar"), random_batches(6, 1), space=SEARCH_SPACE, centre=centre,
                         progress=False)
    reference = metrics.dense_topk(model, random_batches(4, 2), k=16, progress=False)
    evaluator = CandidateEvaluator(model=model, supernet=net, reference=reference, batch_size=3)
    rng = random.Random(0)
    parent = _random_levels(net, rng)
    evaluator.set_parent(parent)
    for _ in range(4):
        child = copy.deepcopy(parent)
        child[-1] = _random_levels(net, rng)[-1]  # differs in the last layer only: most of the forward is cached
        full = metrics.kl_divergence(net.apply(copy.deepcopy(model), child), reference, top_k=16)
        assert evaluator.fitness(child, 4) == pytest.approx(full, rel=1e-4, abs=1e-9)
        assert evaluator.fitness(child, 4, reuse=False) == pytest.approx(full, rel=1e-4, abs=1e-9)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in factory().parameters())


def test_fitness_on_more_sequences_extends_the_known_score():
    model = tiny_llama()
    centre = [s.with_units(MLP, 40) for s in adapter_for(model).shapes(model)]
    net = build_supernet(model, make_criterion("osscar"), random_batches(6, 1), space=SEARCH_SPACE, centre=centre,
                         progress=False)
    evaluator = CandidateEvaluator(model=model, supernet=net, reference=metrics.dense_topk(
        model, random_batches(4, 2), k=16, progress=False), batch_size=2)
    levels = _random_levels(net, random.Random(1))
    few = evaluator.fitness(levels, 1)
    many = evaluator.fitness(levels, 4)
    assert evaluator.evaluated_sequences == 4  # the first sequence was not run again
    assert many == pytest.approx(evaluator.fitness(levels, 4, reuse=False), rel=1e-6)
    assert evaluator.fitness(levels, 1) == few  # a prefix of the known score


def _grid():
    """A grid with clipped levels at both ends: layer 0 keeps 3..0 heads, layer 2's MLP hits min_keep."""
    return _Grid(**{"levels": 2, "grid": [
        {Q_HEADS: [3, 3, 2, 1, 0], MLP: [56, 48, 40, 32, 24]},
        {Q_HEADS: [3, 2, 1, 0, 0], MLP: [48, 40, 32, 24, 16]},
        {Q_HEADS: [3, 3, 3, 2, 1], MLP: [20, 12, 4, 4, 4]},
    ]})


def test_evolution_offspring_are_new_unique_deterministic_and_keep_every_unit_count():
    grid = _grid()
    parent = {param_name(i, u): 0 for i in range(3) for u in (Q_HEADS, MLP)}
    seen = {tuple(sorted({**parent, param_name(0, MLP): 1, param_name(1, MLP): -1}.items()))}
    sampler = EvolutionSampler(offspring=8, seed=0)
    children = sampler.offspring_of(parent, grid, seen, np.random.default_rng(5))
    again = sampler.offspring_of(parent, grid, seen, np.random.default_rng(5))
    assert children == again and len(children) == 8
    keys = {tuple(sorted(c.items())) for c in children}
    assert len(keys) == 8 and not keys & seen and tuple(sorted(parent.items())) not in keys
    for child in children:
        assert grid.totals(child) == grid.totals(parent)
        assert all(-2 <= v <= 2 for v in child.values())


def test_repair_restores_the_unit_counts_of_any_proposal():
    grid = _grid()
    start = {param_name(i, u): 0 for i in range(3) for u in (Q_HEADS, MLP)}
    rng = np.random.default_rng(0)
    for _ in range(20):
        proposal = {name: int(rng.integers(-2, 3)) for name in start}
        repaired = repair(proposal, grid, grid.totals(start), rng)
        assert grid.totals(repaired) == grid.totals(start)


def test_selection_pruner_keeps_the_best_of_each_generation_at_each_step():
    study = optuna.create_study(pruner=SelectionPruner(survivors=[4, 2, 1]))
    values = {0: [0.5, 0.1, 0.4, 0.3], 1: [0.9, 0.8, 0.7, 0.6]}  # two generations, judged apart
    trials = {}
    for generation, row in values.items():
        for value in row:
            trial = study.ask()
            study._storage.set_trial_system_attr(trial._trial_id, ITERATION, 0)
            study._storage.set_trial_system_attr(trial._trial_id, GENERATION, generation)
            trial.report(value, 0)
            trials[(generation, value)] = trial
    pruned = {key for key, trial in trials.items() if trial.should_prune()}
    assert pruned == {(0, 0.5), (0, 0.4), (1, 0.9), (1, 0.8)}
    trials[(0, 0.1)].report(0.2, 1)
    trials[(0, 0.3)].report(0.15, 1)
    assert trials[(0, 0.1)].should_prune() and not trials[(0, 0.3)].should_prune()
    trials[(0, 0.3)].report(0.15, 2)
    assert not trials[(0, 0.3)].should_prune()  # the last step never prunes


def _search(tmp_path, *, name="s", strategy="evolution", resume=False, space=SEARCH_SPACE, seed=0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(layers=6)
    config = SearchConfig(target=0.4, strategy=strategy, seed=seed)
    study = open_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name=name, space=space, config=config,
                       resume=resume)
    return Search(model=model, calibration=random_batches(8, 1), fitness_batches=random_batches(4, 2), space=space,
                  config=config, study=study, supernet_dir=tmp_path / "supernets", progress=False)


def test_search_keeps_the_budget_and_is_deterministic(tmp_path):
    first = _search(tmp_path / "a")
    result = first.run()
    again = _search(tmp_path / "b")
    second = again.run()
    assert result.levels == second.levels and result.fitness == second.fitness
    trials = first.study.trials
    assert [t.params for t in trials] == [t.params for t in again.study.trials]
    # every candidate of an iteration keeps the start's unit counts; the winner is the best complete trial
    for k in range(SEARCH_SPACE.iterations):
        record = schema.iteration_record(first.study, k)
        grid = _Grid.of(record)
        totals = grid.totals(record.start)
        ours = [t for t in trials if t.system_attrs[ITERATION] == k]
        assert all(grid.totals(t.params) == totals for t in ours)
        assert len({t.user_attrs["params"] for t in ours}) == 1  # the exact same parameter count
        assert len({tuple(sorted(t.params.items())) for t in ours}) == len(ours)  # no candidate twice
        assert len(ours) == 1 + SEARCH_SPACE.generations * SEARCH_SPACE.offspring
        states = [t.state for t in ours if t.system_attrs[GENERATION] > 0]
        assert states.count(optuna.trial.TrialState.COMPLETE) == SEARCH_SPACE.generations  # one finalist each
    assert result.fitness == min(t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                                and t.system_attrs[ITERATION] == 1)
    # the winner's shapes are the next iteration's centre (its variants recalibrated around it)
    winner0 = trials[result.iterations[0]["trial"]]
    start1 = next(t for t in trials if t.system_attrs[ITERATION] == 1 and t.system_attrs[GENERATION] == 0)
    assert start1.user_attrs["keeps"] == winner0.user_attrs["keeps"] and set(start1.params.values()) == {0}
    dense = first.dense
    shapes = driver.shapes_of(result.supernet, result.levels, dense)
    assert abs(allocation.sparsity_of(shapes, dense, first.dims) - 0.4) < 0.03


def test_an_interrupted_search_resumes_to_the_same_winner(tmp_path, monkeypatch):
    reference = _search(tmp_path / "whole").run()
    calls = {"n": 0}
    original = SelectionPruner.prune

    def interrupted(self, study, trial):
        calls["n"] += 1
        if calls["n"] == 10:  # mid-generation: the generation's candidates are running
            raise KeyboardInterrupt
        return original(self, study, trial)

    monkeypatch.setattr(SelectionPruner, "prune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "cut").run()
    monkeypatch.setattr(SelectionPruner, "prune", original)
    with pytest.raises(UserError, match="pass resume to continue it"):
        _search(tmp_path / "cut")
    resumed = _search(tmp_path / "cut", resume=True)
    result = resumed.run()
    assert result.levels == reference.levels and result.fitness == reference.fitness
    failed = [t for t in resumed.study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed  # left running by the interrupted run: failed, and their places redone with the same candidate
    for trial in failed:
        redo = [t for t in resumed.study.trials if t.number > trial.number and t.state != optuna.trial.TrialState.FAIL
                and t.system_attrs[ITERATION] == trial.system_attrs[ITERATION]
                and t.system_attrs[GENERATION] == trial.system_attrs[GENERATION]
                and t.system_attrs["tyr:index"] == trial.system_attrs["tyr:index"]]
        assert len(redo) == 1 and redo[0].params == trial.params


@pytest.mark.parametrize("strategy", ["tpe", "cmaes"])
def test_tpe_and_cmaes_keep_the_budget_too(tmp_path, strategy):
    space = SearchSpace(**{**SEARCH_SPACE.__dict__, "iterations": 1, "generations": 2})
    search = _search(tmp_path, strategy=strategy, space=space)
    search.run()
    record = schema.iteration_record(search.study, 0)
    grid = _Grid.of(record)
    assert all(grid.totals(t.params) == grid.totals(record.start) for t in search.study.trials)


def test_settings_must_match_to_resume_and_unreachable_targets_are_refused(tmp_path):
    _search(tmp_path, space=SearchSpace(**{**SEARCH_SPACE.__dict__, "iterations": 1, "generations": 1}))
    with pytest.raises(UserError, match="other settings"):
        _search(tmp_path, resume=True, seed=1)
    tight = SearchSpace(**{**SEARCH_SPACE.__dict__, "units": {MLP: UnitSpace(min_keep=60, step=8)}})
    with pytest.raises(UserError, match="cannot be reached"):
        _search(tmp_path / "tight", space=tight)


def test_a_corrupt_cached_supernet_is_rebuilt_or_refused(tmp_path):
    search = _search(tmp_path)
    centre = allocation.uniform(search.dense, sparsity=0.4, dims=search.dims)
    net = search.supernet(centre, SEARCH_SPACE)
    folder = next((tmp_path / "supernets").iterdir())
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    rebuilt = search.supernet(centre, SEARCH_SPACE)
    assert rebuilt.grid == net.grid and torch.equal(rebuilt.selection(0, MLP, 1).kept, net.selection(0, MLP, 1).kept)
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(b"broken")
    strict = _search(tmp_path / "strict")
    strict.supernet_dir, strict.config = search.supernet_dir, SearchConfig(target=0.4, no_rebuild=True)
    with pytest.raises(UserError, match="corrupt"):
        strict.supernet(centre, SEARCH_SPACE)


def test_an_exhausted_neighbourhood_gives_fewer_offspring_and_then_none():
    grid = _Grid(**{"levels": 1, "grid": [{MLP: [24, 16, 8]}, {MLP: [24, 16, 8]}]})
    parent = {param_name(0, MLP): 0, param_name(1, MLP): 0}
    sampler = EvolutionSampler(offspring=8, seed=0)
    children = sampler.offspring_of(parent, grid, set(), np.random.default_rng(0))
    keys = {tuple(sorted(c.items())) for c in children}
    assert keys == {((param_name(0, MLP), 1), (param_name(1, MLP), -1)),
                    ((param_name(0, MLP), -1), (param_name(1, MLP), 1))}
    assert sampler.offspring_of(parent, grid, keys, np.random.default_rng(0)) == []


def test_ppl_fitness_is_the_perplexity_of_the_assembled_model():
    model = tiny_llama()
    centre = [s.with_units(MLP, 40) for s in adapter_for(model).shapes(model)]
    net = build_supernet(model, make_criterion("osscar"), random_batches(6, 1), space=SEARCH_SPACE, centre=centre,
                         progress=False)
    reference = metrics.dense_topk(model, random_batches(4, 2), k=16, progress=False)
    evaluator = CandidateEvaluator(model=model, supernet=net, reference=reference, metric="ppl", batch_size=2)
    levels = _random_levels(net, random.Random(2))
    expected = metrics.perplexity(net.apply(copy.deepcopy(model), levels), random_batches(4, 2), progress=False)["ppl"]
    assert evaluator.fitness(levels, 4) == pytest.approx(expected, rel=1e-5)


def test_validation_picks_each_iterations_winner_among_its_best_on_held_back_tokens(tmp_path):
    space = replace(SEARCH_SPACE, validation=Validation(candidates=3, tokens=48))
    model = tiny_llama(layers=6)
    config = SearchConfig(target=0.4)
    study = open_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="v", space=space, config=config,
                       resume=False)
    held_back = random_batches(2, 3)
    with pytest.raises(ValueError, match="held-back sequences"):
        Search(model=model, calibration=random_batches(8, 1), fitness_batches=random_batches(4, 2), space=space,
               config=config, study=study, supernet_dir=tmp_path / "supernets", progress=False)
    search = Search(model=model, calibration=random_batches(8, 1), fitness_batches=random_batches(4, 2), space=space,
                    config=config, study=study, supernet_dir=tmp_path / "supernets", validation_batches=held_back,
                    progress=False)
    result = search.run()
    reference = metrics.dense_topk(model, held_back, k=16, progress=False)
    trials = study.trials
    for k, summary in enumerate(result.iterations):
        complete = sorted((t for t in trials if t.system_attrs[ITERATION] == k
                           and t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: (t.values[0], t.number))
        scores = {v["trial"]: v["validation"] for v in summary["validation"]}
        assert list(scores) == [t.number for t in complete[:3]]  # the 3 best, all distinct here
        assert len({tuple(sorted(trials[n].params.items())) for n in scores}) == 3
        assert study.user_attrs[f"iteration{k}"]["validation"] == {str(n): v for n, v in scores.items()}
        winner = trials[summary["trial"]]
        assert scores[winner.number] == min(scores.values())
        # the held-back score is the assembled candidate's KL on the held-back sequences
        supernet = Supernet.load(study.user_attrs[f"iteration{k}"]["supernet"])
        levels = driver.params_to_levels(winner.params, len(search.dense))
        assembled = supernet.apply(copy.deepcopy(model), levels)
        assert scores[winner.number] == pytest.approx(metrics.kl_divergence(assembled, reference), rel=1e-4)
    assert result.levels == driver.params_to_levels(trials[result.iterations[-1]["trial"]].params, 6)
    # a validated winner's shapes are the next iteration's centre
    start1 = next(t for t in trials if t.system_attrs[ITERATION] == 1 and t.system_attrs[GENERATION] == 0)
    assert start1.user_attrs["keeps"] == trials[result.iterations[0]["trial"]].user_attrs["keeps"]

"""Budgets other than parameters: FLOPs, and latency from a table measured in ONNX Runtime on this machine;
the latency table itself (real exports, cached per machine); NSGA-II over quality and latency with its
Pareto front."""

import json

import numpy as np
import optuna
import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tests.conftest import SEARCH_SPACE, TINY_SPACE, VOCAB, random_batches, run_cli, space_file, tiny_llama
from tyrsearch import allocation
from tyrsearch.allocation import Dims
from tyrsearch.budget import FlopsBudget, LatencyBudget, LatencyTable, ParamsBudget, limit
from tyrsearch.materialize import save_pruned
from tyrsearch.models import MLP, Q_HEADS, LayerShape
from tyrsearch.search import driver, knapsack
from tyrsearch.search.driver import Search, SearchConfig, centre_for, open_study, parse_objectives
from tyrsearch.search.samplers import EvolutionSampler, _Grid, param_name
from tyrsearch.supernet import Supernet

DENSE = [LayerShape(kv_heads=1, q_per_kv=2, intermediate=64)] * 4
DIMS = Dims(hidden=32, head_dim=8)
TABLE = LatencyTable(machine="test", model="test", seq_len=128, threads=1, base_ms=1.0,
                     attention_ms={(1, 1): 0.3, (1, 2): 0.5}, mlp_ms={0: 0.0, 32: 0.2, 64: 0.6})


def test_latency_table_interpolates_mlp_widths_and_removed_blocks_cost_nothing():
    assert TABLE.mlp(DENSE[0].with_units(MLP, 48)) == pytest.approx(0.4)
    assert TABLE.mlp(DENSE[0].with_units(MLP, 16)) == pytest.approx(0.1)
    assert TABLE.attention(DENSE[0].with_units(Q_HEADS, 0)) == 0.0
    assert TABLE.estimate(DENSE) == pytest.approx(1.0 + 4 * (0.5 + 0.6))
    assert LatencyTable.from_dict(json.loads(json.dumps(TABLE.to_dict()))) == TABLE


def test_flops_count_weights_twice_attention_over_half_the_context_and_the_lm_head():
    flops = FlopsBudget(dims=DIMS, seq_len=128, vocab=100)
    shape = DENSE[0]
    weights = 32 * 8 * (2 * 2 + 2 * 1) + 3 * 32 * 64
    assert flops.layer(shape) == 2 * weights + 2 * 128 * 2 * 8
    assert flops.total(DENSE) == 4 * flops.layer(shape) + 2 * 32 * 100


@pytest.mark.parametrize("budget", [FlopsBudget(dims=DIMS, seq_len=128, vocab=100), LatencyBudget(table=TABLE)])
def test_the_centre_of_a_flops_or_latency_budget_is_the_densest_uniform_plan_within_the_limit(budget):
    centre = centre_for(budget, DENSE, DIMS, 0.3)
    most = limit(budget, DENSE, 0.3)
    assert budget.total(centre) <= most
    wider = [s.with_units(MLP, s.intermediate + 1) for s in centre]
    assert budget.total(wider) > most or wider[0].intermediate > 64
    assert ParamsBudget(dims=DIMS).total(centre) < ParamsBudget(dims=DIMS).total(DENSE)


def test_latency_offspring_trade_any_two_blocks_within_the_band():
    keeps = {"q": [2, 1, 0], "mlp": [64, 48, 32]}
    cost = {}
    for layer in range(4):
        cost[param_name(layer, Q_HEADS)] = [TABLE.attention(DENSE[0].with_units(Q_HEADS, k)) for k in keeps["q"]]
        cost[param_name(layer, MLP)] = [TABLE.mlp(DENSE[0].with_units(MLP, k)) for k in keeps["mlp"]]
    parent = {name: 0 for name in cost}
    total = sum(levels[1] for levels in cost.values())
    grid = _Grid(**{"levels": 1, "grid": [{Q_HEADS: keeps["q"], MLP: keeps["mlp"]}] * 4, "cost": cost,
                  "band": [total - 0.15, total + 0.05]})
    children = EvolutionSampler(offspring=16, seed=0).offspring_of(
        {name: 0 for name in cost}, grid, set(), np.random.default_rng(0))
    assert len(children) == 16
    for child in children:
        price = sum(grid.keep(name, level) for name, level in child.items())
        assert total - 0.15 - 1e-9 <= price <= total + 0.05 + 1e-9
    moved = [{name.split(".")[1] for name in child if child[name] != parent[name]} for child in children]
    assert any(units == {Q_HEADS, MLP} for units in moved)  # attention traded against MLP


def test_latency_savings_are_rounded_down_so_the_knapsack_start_never_exceeds_the_limit():
    # each MLP step saves 0.0016 ms: to the nearest microsecond that is 2, really 1.6; over 4 layers
    # rounding up would claim 0.0024 ms that are not there
    table = LatencyTable(machine="t", model="t", seq_len=128, threads=1, base_ms=1.0,
                         attention_ms={(1, 2): 0.5}, mlp_ms={32: 0.6 - 0.0032, 64: 0.6})
    budget = LatencyBudget(table=table)
    net = Supernet(grid=[{MLP: [64, 48, 32]}] * 4, levels=1, variants={}, manifest={})
    removed = knapsack.removed_price(net, DENSE, budget)
    for (idx, unit, level), units in removed.items():
        saved = budget.layer(DENSE[idx]) - budget.layer(DENSE[idx].with_units(unit, net.keep(idx, unit, level)))
        assert units * budget.resolution <= saved + 1e-12 and units == int(saved / budget.resolution)
    assert removed[(0, MLP, 0)] == 1


@pytest.mark.parametrize(("text", "ok"), [("kl", True), ("kl,latency", True), ("kl, flops", True),
                                          ("latency", False), ("kl,speed", False), ("kl,params,flops", False)])
def test_objectives_parse_or_say_what_is_allowed(text, ok):
    if ok:
        assert parse_objectives(text)[0] == "kl"
    else:
        with pytest.raises(Exception, match="give kl, or kl and one of latency, params, flops"):
            parse_objectives(text)


# -- the real thing: a table measured here, and searches that use it ------------------------------------


@pytest.fixture(scope="module")
def lean(tmp_path_factory, smollm2_folder):
    """A tiny random Llama (1 KV group of 2 query heads: few probes) with SmolLM2's tokenizer, a text file,
    and a tyrsearch cache of its own with the latency table measured once (real exports, real timings)."""
    root = tmp_path_factory.mktemp("lean")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("TYRSEARCH_CACHE", str(root / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    save_pruned(LlamaForCausalLM(config).eval(), tokenizer, root / "model")
    text = root / "text.txt"
    text.write_text(" ".join(f"The river {i} flows into the sea near the old town." for i in range(400)))
    built = run_cli("latency", "--model", str(root / "model"), "--check", "2", "--repeats", "5", "--json")
    assert built.returncode == 0, built.stderr
    yield {"root": root, "model": root / "model", "text": text, "built": json.loads(built.stdout)}
    monkey.undo()


def test_latency_table_is_measured_once_per_machine_and_checked_against_whole_models(lean):
    built = lean["built"]
    assert not built["cached"] and built["seq_len"] == 128 and built["threads"] >= 1
    assert [kv_q for *kv_q, _ in built["attention_ms"]] == [[1, 1], [1, 2]]
    assert [width for width, _ in built["mlp_ms"]] == [0, 64]
    assert built["base_ms"] > 0 and all(ms >= 0 for *_, ms in built["attention_ms"] + built["mlp_ms"])
    for column in ("attention_ms", "mlp_ms"):  # a larger block never costs less, whatever the noise said
        figures = [ms for *_, ms in built[column]]
        assert figures == sorted(figures)
    assert [row["label"] for row in built["check"]] == ["dense", "uniform 0.3"]
    for row in built["check"]:
        assert row["measured_ms"] > 0 and row["error"] == pytest.approx(row["estimate_ms"] / row["measured_ms"] - 1)
    assert built["check"][0]["estimate_ms"] >= built["check"][1]["estimate_ms"]  # pruning never adds latency
    again = run_cli("latency", "--model", str(lean["model"]), "--check", "0", "--repeats", "5", "--json")
    cached = json.loads(again.stdout)
    assert cached["cached"] and cached["attention_ms"] == built["attention_ms"] and cached["check"] == []


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "no/such/folder"], "not found"),
    (["--check", "9"], "--check"),
])
def test_bad_latency_input_is_one_line_exit_2(lean, args, message):
    result = run_cli("latency", "--model", str(lean["model"]), *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _search(lean, out, *extra):
    out.parent.mkdir(parents=True, exist_ok=True)
    space = space_file(out.parent, TINY_SPACE)
    return run_cli("search", "--model", str(lean["model"]), "--space", str(space), "--calib", str(lean["text"]),
                   "--calib-seqs", "4", "--seq-len", "32", "--out", str(out), "--supernet-dir",
                   str(out.parent / "nets"), "--json", *extra)


def _trials(out):
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")
    return study, study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def test_a_flops_budget_is_kept_exactly_by_every_candidate(tmp_path):
    model = tiny_llama(layers=6)
    config = SearchConfig(target=0.3, budget="flops")
    study = open_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="f", space=SEARCH_SPACE, config=config,
                       resume=False)
    dims = Dims(hidden=48, head_dim=8)
    budget = FlopsBudget(dims=dims, seq_len=24, vocab=VOCAB)
    search = Search(model=model, calibration=random_batches(8, 1), fitness_batches=random_batches(4, 2),
                    space=SEARCH_SPACE, config=config, study=study, supernet_dir=tmp_path / "nets", budget=budget,
                    progress=False)
    result = search.run()
    most = limit(budget, search.dense, 0.3)
    winner = budget.total(driver.shapes_of(result.supernet, result.levels, search.dense))
    assert most - 2 * 3 * 48 * 8 < winner <= most  # the knapsack start is within one MLP step of the limit
    for k in range(SEARCH_SPACE.iterations):
        ours = [t for t in study.trials if t.user_attrs["iteration"] == k]
        assert {t.user_attrs["flops_per_token"] for t in ours} == {winner if k else ours[0].user_attrs[
            "flops_per_token"]}  # the exact same FLOPs for every candidate of an iteration
        assert all(t.user_attrs["within_budget"] for t in ours)
    assert study.user_attrs["settings"]["budget"] == "flops"


def test_a_latency_budget_keeps_every_candidate_within_the_band(lean, tmp_path):
    table = lean["built"]
    estimate = LatencyTable.from_dict(table).estimate
    dense = [LayerShape(kv_heads=1, q_per_kv=2, intermediate=64)] * 4
    halved = allocation.uniform(dense, sparsity=0.3, dims=DIMS)  # what uniform MLP pruning reaches
    target = round(1 - estimate(halved) / estimate(dense), 4)
    ran = _search(lean, tmp_path / "lat" / "run", "--budget", "latency", "--target", str(target))
    assert ran.returncode == 0, ran.stderr
    assert "latency probes" not in ran.stderr  # the table measured by `tyrsearch latency` is reused
    result = json.loads(ran.stdout)
    budget = result["budget"]
    assert budget["name"] == "latency" and budget["dense"] == pytest.approx(table["dense_estimate_ms"])
    assert budget["limit"] == pytest.approx((1 - target) * table["dense_estimate_ms"])
    assert budget["winner"] <= budget["limit"] + 1e-6
    assert result["latency_ms"]["machine"] == table["machine"]
    _, trials = _trials(tmp_path / "lat" / "run")
    assert all(t.user_attrs["within_budget"] and t.user_attrs["latency_ms"] <= budget["limit"] + 1e-6
               for t in trials)


def test_nsga2_over_kl_and_latency_reports_a_pareto_front(lean, tmp_path):
    out = tmp_path / "pareto" / "run"
    ran = _search(lean, out, "--objectives", "kl,latency", "--target", "0.3")
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["config"]["strategy"] == "nsga2" and result["config"]["objectives"] == ["kl", "latency"]
    front = result["pareto_front"]
    assert front and [r["latency"] for r in front] == sorted(r["latency"] for r in front)
    assert all(a["kl"] >= b["kl"] for a, b in zip(front, front[1:], strict=False))  # costlier only if better
    study, trials = _trials(out)
    for k in (0, 1):  # no candidate twice in an iteration (NSGA-II's repeats are moved)
        params = [tuple(sorted(t.params.items())) for t in trials if t.user_attrs["iteration"] == k]
        assert len(set(params)) == len(params)
    assert study.metric_names == ["kl", "latency_ms"] and len(study.directions) == 2
    for row in front:  # nothing the study measured dominates a member of the front
        assert not any(t.values[0] <= row["kl"] and t.values[1] <= row["latency"] and t.values != [row["kl"],
                       row["latency"]] for t in trials if t.values)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)  # one stage: nothing pruned
    assert result["budget"]["winner"] <= result["budget"]["limit"] + 1e-6 or not any(
        r["within_budget"] for r in front)
    report = (out / "report.html").read_text()
    assert "Pareto front: kl vs latency" in report and report.count("<svg") == 4


@pytest.mark.parametrize(("args", "message"), [
    (["--objectives", "kl,speed"], "--objectives 'kl,speed' is not valid"),
    (["--strategy", "nsga2"], "--strategy nsga2 searches several --objectives"),
    (["--objectives", "kl,latency", "--strategy", "tpe"], "--strategy nsga2 searches several --objectives"),
    (["--budget", "watts"], "--budget 'watts' is unknown"),
])
def test_bad_budget_or_objective_input_is_one_line_exit_2(lean, tmp_path, args, message):
    ran = _search(lean, tmp_path / "run", "--target", "0.3", *args)
    assert ran.returncode == 2 and message in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()

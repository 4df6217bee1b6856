"""A whole search, as `tyrsearch.search` and `tyrsearch search` run it: check the request, open the study,
run it on a runner, materialize the winner, measure it and write OUT/model, result.json and report.html."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tyrsearch.errors import ParameterError, mention
from tyrsearch.results import SearchResult

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from tyrsearch.api import ModelRef
    from tyrsearch.healing import Heal


@dataclass(frozen=True)
class SearchRequest:
    """Every setting of one search (see `tyrsearch.api.search`)."""

    target: float
    out: Path
    space: str | Path | None
    budget: str
    objectives: str  # "kl" or "kl,COST"
    calib: str
    calib_seqs: int
    seq_len: int
    criterion: str
    strategy: str | None
    start: str
    sensitivity_seqs: int
    latency_seq_len: int
    storage: str | None
    study_name: str | None
    runner: str
    workers: int | None  # None: one per GPU, or one
    worker_threads: int | None
    address: str | None
    heartbeat: int
    seed: int
    resume: bool
    supernet_dir: Path | None
    no_rebuild: bool
    eval_tokens: int
    eval_text: str
    device: str = "auto"
    dtype: str = "auto"
    heal: Heal | None = None  # healing of the winner (none: no healing)

    @property
    def heals(self) -> bool:
        return self.heal is not None and self.heal.steps > 0

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"


@dataclass(frozen=True)
class Checked:
    """What checking a request settles before the model loads."""

    goals: tuple[str, ...]
    strategy: str
    space: object | None  # a SearchSpace, or None for the family's default
    study_name: str


def check_request(request: SearchRequest, model_name: str) -> Checked:
    """Every mistake in the request, before anything loads or is written."""
    from tyrsearch import allocation, texts
    from tyrsearch.api import check_out_dir
    from tyrsearch.budget import BUDGETS
    from tyrsearch.local import make_criterion
    from tyrsearch.placement import placement
    from tyrsearch.search.driver import STARTS, parse_objectives
    from tyrsearch.search.samplers import STRATEGIES
    from tyrsearch.space import load_space

    placement(request.device, request.dtype)
    allocation.check_sparsity(request.target, parameter="target")
    make_criterion(request.criterion)
    if request.budget not in BUDGETS:
        raise ParameterError("budget", f"{request.budget!r} is unknown: choose one of {', '.join(BUDGETS)}")
    goals = parse_objectives(request.objectives)
    strategy = request.strategy or ("nsga2" if len(goals) > 1 else "evolution")
    if strategy not in STRATEGIES:
        raise ParameterError("strategy", f"{strategy!r} is unknown: choose one of {', '.join(STRATEGIES)}")
    if (strategy == "nsga2") != (len(goals) > 1):
        raise ParameterError("strategy", f"nsga2 searches several {mention('objectives')} (e.g. kl,latency) and "
                                         "they need it: give both or neither")
    if request.runner == "ray" and len(goals) > 1:
        raise ParameterError("objectives", f"{request.objectives!r}: several objectives run with {mention('runner')} "
                                           "local or optuna (Ray Tune's OptunaSearch here reports one metric)")
    if request.heals and request.heal.candidates and len(goals) > 1:
        raise ParameterError("heal_candidates", f"ranks candidates by KL alone: search one objective (no "
                                                f"{mention('objectives')} cost) or drop it")
    if request.start not in STARTS:
        raise ParameterError("start", f"{request.start!r} is unknown: choose one of {', '.join(STARTS)}")
    space = load_space(str(request.space)) if request.space else None
    if not request.resume:
        check_out_dir(request.out, overwrite=False)
    elif not request.out.is_dir():
        raise ParameterError("resume", f"{request.out} does not exist; run the search without {mention('resume')} "
                                       "first")
    for source in [*texts.mixture(request.calib), *(texts.mixture(request.eval_text) if request.eval_tokens else ()),
                   *(texts.mixture(request.heal.text) if request.heals else ())]:
        texts.read_text(source)  # a missing corpus fails before the model loads
    return Checked(goals=goals, strategy=strategy, space=space,
                   study_name=request.study_name or f"{model_name}-t{request.target:g}")


def run_search(model: ModelRef, request: SearchRequest, *, tokenizer: PreTrainedTokenizerBase | None = None,
               progress: bool = True, teacher: nn.Module | None = None) -> SearchResult:
    """One search (see `tyrsearch.api.search`); the winner is healed from `teacher` (default: `model`)."""
    from tyrsearch.api import load
    from tyrsearch.materialize import save_pruned
    from tyrsearch.placement import default_workers, placement_of
    from tyrsearch.runners import make_runner
    from tyrsearch.search.driver import materialize
    from tyrsearch.search.job import Job
    from tyrsearch.search.storage import open_storage

    if request.workers is None:
        request = replace(request, workers=default_workers())
    loaded_model = not isinstance(model, str | Path)
    if loaded_model and request.runner != "local":
        raise ParameterError("runner", f"{request.runner} loads the model in its workers: pass a model reference "
                                       "(an alias, folder or .gguf file) instead of a loaded model")
    name = model.config.name_or_path if loaded_model else str(model)
    checked = check_request(request, Path(name).name.removesuffix(".gguf"))
    runner = make_runner(request.runner, storage_url=request.storage_url, study_name=checked.study_name,
                         workers=request.workers, threads=request.worker_threads, heartbeat_s=request.heartbeat,
                         address=request.address, device=request.device)
    store = open_storage(request.storage_url, heartbeat_s=request.heartbeat) if request.storage else None
    loaded = load(model, tokenizer, device=request.device, dtype=request.dtype)
    job = Job.of(model=name, calib=request.calib, calib_seqs=request.calib_seqs, seq_len=request.seq_len,
                 seed=request.seed, dtype=placement_of(loaded.model).to_json()["dtype"])  # workers' precision
    search = _prepare(loaded, request, checked, job, store, progress=progress)
    found = runner.run(search)
    selected = None
    if request.heals and request.heal.candidates:
        tic = time.perf_counter()
        found, selected = _select_healed(search, found, request, loaded.tokenizer, progress=progress)
        found.times_s["heal_select"] = time.perf_counter() - tic
    tic = time.perf_counter()
    pruned = materialize(loaded.model, found)
    save_pruned(pruned, loaded.tokenizer, request.out / ("model-oneshot" if request.heals else "model"))
    figures = _figures(loaded.ref, request, checked, search, found, pruned)
    if selected is not None:
        figures["heal_select"] = {"steps": request.heal.select_steps, "candidates": selected}
    times = {**found.times_s, "materialize": time.perf_counter() - tic}
    if request.eval_tokens:
        tic = time.perf_counter()
        figures["held_out"] = held_out(pruned, loaded.tokenizer, request, progress=progress)
        times["eval"] = time.perf_counter() - tic
    if request.heals:
        tic = time.perf_counter()
        pruned, figures["heal"] = _heal(teacher or loaded.model, loaded.tokenizer, request, progress=progress)
        times["heal"] = time.perf_counter() - tic
    figures["times_s"] = times
    _write(request.out, search, figures)
    return SearchResult(figures=figures, out=request.out, model=pruned, tokenizer=loaded.tokenizer)


def _prepare(loaded, request: SearchRequest, checked: Checked, job, store, *, progress: bool):
    """The study opened (or resumed) and the `Search` over it, with its budget and batches."""
    from tyrsearch import assets
    from tyrsearch.budget import make_budget
    from tyrsearch.models import adapter_for
    from tyrsearch.pruner import dims_of
    from tyrsearch.search import study as schema
    from tyrsearch.search.driver import Search, SearchConfig, check_reachable, objective_space, open_study
    from tyrsearch.search.job import Job
    from tyrsearch.search.storage import open_storage
    from tyrsearch.space import load_space

    model = loaded.model
    adapter = adapter_for(model)
    space = objective_space(checked.space or load_space(adapter.search_space), checked.goals)
    dense = adapter.shapes(model)
    space.check_model(dense, adapter.unit_types)
    table = None
    if request.budget == "latency" or "latency" in checked.goals:
        from tyrsearch.exporters.latency import Workload, table_for

        table, _ = table_for(model, Workload(seq_len=request.latency_seq_len))
    cost = make_budget(request.budget, dims=dims_of(model), seq_len=request.seq_len, vocab=model.config.vocab_size,
                       table=table)
    check_reachable(space, dense, cost, request.target)
    config = SearchConfig(target=request.target, criterion=request.criterion, strategy=checked.strategy,
                          start=request.start, seed=request.seed, budget=request.budget, objectives=checked.goals,
                          sensitivity_sequences=request.sensitivity_seqs, no_rebuild=request.no_rebuild)
    request.out.mkdir(parents=True, exist_ok=True)
    store = store or open_storage(request.storage_url, heartbeat_s=request.heartbeat)  # SQLite lives in out
    study = open_study(storage=store, study_name=checked.study_name, space=space, config=config,
                       resume=request.resume)
    if schema.job(study) is not None and Job(**schema.job(study)) != job:  # (a study from before `dtype`: float32)
        raise ParameterError("study_name", f"{checked.study_name!r} searches another model or calibration: resume "
                             f"with the same model, {mention('calib')}, {mention('calib_seqs')}, "
                             f"{mention('seq_len')}, {mention('seed')} and {mention('dtype')}, or choose another "
                             "study")
    schema.set_job(study, job.to_dict())
    batches = job.batches(loaded.tokenizer, space)
    return Search(model=model, calibration=batches.calibration, fitness_batches=batches.fitness,
                  validation_batches=batches.validation, space=space, config=config, study=study,
                  supernet_dir=request.supernet_dir or assets.cache_dir() / "supernets", budget=cost, latency=table,
                  progress=progress)


def _figures(model_name: str, request: SearchRequest, checked: Checked, search, found, pruned) -> dict:
    """result.json, before the held-out figures and the times."""
    from tyrsearch import allocation, metrics
    from tyrsearch.budget import limit
    from tyrsearch.models import adapter_for
    from tyrsearch.placement import placement_of
    from tyrsearch.search.report import pareto_front
    from tyrsearch.search.storage import redact

    dense, shapes = search.dense, adapter_for(pruned).shapes(pruned)
    cost, table, study, space = search.budget, search.latency, search.study, search.space
    return {
        "model": model_name, "target": request.target,
        "budget": {"name": request.budget, "dense": cost.total(dense), "limit": limit(cost, dense, request.target),
                   "winner": cost.total(shapes)},
        **({"latency_ms": {"dense": table.estimate(dense), "winner": table.estimate(shapes),
                           "seq_len": table.seq_len, "machine": table.machine}} if table else {}),
        "achieved_sparsity": allocation.sparsity_of(shapes, dense, search.dims),
        "params_before": metrics.total_params(search.model), "params_after": metrics.total_params(pruned),
        "decoder_params_before": metrics.decoder_params(search.model),
        "decoder_params_after": metrics.decoder_params(pruned),
        "fitness": {"metric": space.fitness.metric, "value": found.fitness, "tokens": space.selection[-1].tokens},
        "layers": [s.block_config() for s in shapes],
        "iterations": found.iterations,
        **({"workers": found.workers} if found.workers else {}),
        **({"pareto_front": pareto_front(study, checked.goals)} if len(checked.goals) > 1 else {}),
        "calibration": {"source": request.calib, "sequences": request.calib_seqs, "seq_len": request.seq_len,
                        "seed": request.seed},
        "placement": placement_of(search.model).to_json(),
        "study": {"storage": redact(request.storage_url), "name": checked.study_name, "trials": len(study.trials)},
        "config": {"criterion": request.criterion, "strategy": checked.strategy, "start": request.start,
                   "space": space.family, "objectives": list(checked.goals), "runner": request.runner,
                   "workers": request.workers if request.runner != "local" else 1},
    }


def _select_healed(search, found, request: SearchRequest, tokenizer, *, progress: bool):
    """The winner chosen by healing-aware selection (`tyrsearch.search.heal_select`), and its rows."""
    from tyrsearch import texts
    from tyrsearch.healing import HEAL_BATCH, HEAL_SEQ_LEN, text_windows
    from tyrsearch.search.heal_select import select_healed

    sources = {name: texts.read_text(name) for name in texts.mixture(request.heal.text)}
    windows = text_windows(tokenizer, sources, seq_len=HEAL_SEQ_LEN, batch_size=HEAL_BATCH, parameter="heal_text")
    return select_healed(search, found, request.heal, windows, request.out / "heal-select", progress=progress)


def _heal(teacher, tokenizer, request: SearchRequest, *, progress: bool):
    """OUT/model-oneshot distilled from the dense model into OUT/model: the healed model and the heal's
    figures (with the held-out perplexities after it, as `held_out` measured them before)."""
    from tyrsearch import texts
    from tyrsearch.api import heal_saved

    sources = {name: texts.read_text(name) for name in texts.mixture(request.eval_text)} if request.eval_tokens \
        else {}
    healed = heal_saved(teacher, request.out / "model-oneshot", request.out / "model", request.heal,
                        tokenizer=tokenizer, held_out=sources, seq_len=request.seq_len,
                        eval_tokens=request.eval_tokens, device=request.device, dtype=request.dtype,
                        progress=progress)
    return healed.model, healed.figures


def held_out(model, tokenizer, request: SearchRequest, *, progress: bool) -> dict:
    """{text: {ppl, nll, tokens}} on the first `eval_tokens` of each `eval_text`."""
    from tyrsearch import metrics, texts

    sources = {name: texts.read_text(name) for name in texts.mixture(request.eval_text)}
    return metrics.held_out(model, tokenizer, sources, seq_len=request.seq_len, max_tokens=request.eval_tokens,
                            progress=progress)


def _write(out: Path, search, figures: dict) -> None:
    """result.json, the same figures in the study (`tyrsearch report` renders from the study alone) and
    report.html."""
    from tyrsearch.atomic import write_json
    from tyrsearch.search import study as schema
    from tyrsearch.search.driver import uniform_centre
    from tyrsearch.search.report import write_report

    write_json(out / "result.json", figures)
    schema.set_result(search.study, figures)
    write_report(out / "report.html", study=search.study, result=figures, dense=search.dense,
                 uniform=uniform_centre(search.dense, search.dims, figures["achieved_sparsity"]))

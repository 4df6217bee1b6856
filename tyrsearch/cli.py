"""The `tyrsearch` command line. Every command that produces something writes into --out and, with
--json, prints one JSON object on stdout. User errors exit with status 2 and one line on stderr."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click

from tyrsearch.errors import UserError
from tyrsearch.runners import RUNNERS as RUNNER_NAMES

MODEL_HELP = "a local HF folder, a .gguf file, or an alias (smollm2-135m, gemma3-270m)"
TEXT_HELP = ("a named text (calibration: c4, wiki; held-out: wiki-summaries, literature, code, docs) or a UTF-8 "
             "text file")
CALIB_HELP = f"{TEXT_HELP}; several joined by commas (c4,wiki) take sequences from each in turn"


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            if not isinstance(value, list | dict):
                click.echo(f"{key}: {value}")


def _check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse a used or unwritable --out before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder or pass --overwrite")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise UserError(f"--out {out} is not writable ({exc.strerror}); choose a folder you can write to") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tyrsearch")
def cli() -> None:
    """tyrsearch: find how much to prune in each layer of a transformer, prune it, and ship it."""


@cli.command("eval")
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.option("--text", "text_source", default="wiki-summaries", show_default=True, help=TEXT_HELP)
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--max-tokens", default=65536, show_default=True, type=click.IntRange(min=2),
              help="tokens of text to evaluate (whole sequences of --seq-len)")
@click.option("--zero-shot", "zero_shot_limit", default=0, show_default=True, type=click.IntRange(min=0),
              help="also score N examples each of ARC-Easy, PIQA, HellaSwag, WinoGrande (0: skip)")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def eval_command(model_ref: str, text_source: str, seq_len: int, max_tokens: int, zero_shot_limit: int,
                 batch_size: int, as_json: bool) -> None:
    """Perplexity (and optionally zero-shot accuracy) of a model on a text."""
    from tyrsearch import assets, data, evaluate, texts

    text = texts.read_text(text_source)
    model, tokenizer = assets.load_model(model_ref)
    batches = data.eval_batches(tokenizer, text, seq_len=seq_len, max_tokens=max_tokens)
    start = time.perf_counter()
    result = evaluate.perplexity(model, batches, batch_size=batch_size)
    elapsed = time.perf_counter() - start
    out = {
        "ppl": result["ppl"], "tokens": result["tokens"],
        "params": evaluate.total_params(model), "decoder_params": evaluate.decoder_params(model),
        "model": model_ref, "text": text_source, "seq_len": seq_len,
        "time_s": round(elapsed, 3), "tokens_per_s": round(result["tokens"] / elapsed, 1),
    }
    if zero_shot_limit:
        out["zero_shot"] = evaluate.zero_shot(model, tokenizer, limit=zero_shot_limit)
    _emit(out, as_json)


@cli.command("prune")
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.option("--criterion", default="osscar", show_default=True,
              help="local criterion: osscar, flap, wanda, taylor, magnitude, random")
@click.option("--sparsity", required=True, type=float,
              help="fraction in [0, 1) of the decoder layers' prunable parameters to remove "
                   "(q/k/v/o and gate/up/down weights; embeddings and lm_head excluded)")
@click.option("--allocation", default="uniform", show_default=True,
              help="uniform, owl, or knapsack (per-layer sensitivity curves from the supernet + a dynamic program)")
@click.option("--space", "space_name", default=None,
              help="knapsack only: search space name or YAML (default: the family's, e.g. llama)")
@click.option("--sensitivity-seqs", default=2, show_default=True, type=click.IntRange(min=1),
              help="knapsack only: calibration sequences on which each layer variant's KL is measured")
@click.option("--attention-sparsity", default=0.0, show_default=True, type=float,
              help="fraction of each layer's attention removed (whole heads / KV groups); MLP channels do the rest")
@click.option("--calib", "calib_source", default="c4,wiki", show_default=True, help=CALIB_HELP)
@click.option("--calib-seqs", default=64, show_default=True, type=click.IntRange(min=1),
              help="calibration sequences of --seq-len tokens")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--sequential/--no-sequential", default=True, show_default=True,
              help="calibrate each layer on the outputs of the already pruned layers before it")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for the pruned HF model and result.json")
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def prune_command(model_ref: str, criterion: str, sparsity: float, allocation: str, space_name: str | None,
                  sensitivity_seqs: int, attention_sparsity: float, calib_source: str, calib_seqs: int, seq_len: int,
                  sequential: bool, seed: int, out_dir: Path, overwrite: bool, as_json: bool) -> None:
    """Prune a model one-shot with a local criterion and a layer allocation; save it as an HF folder."""
    from tyrsearch import allocation as allocations
    from tyrsearch import assets, data, evaluate, texts
    from tyrsearch.local import make_criterion
    from tyrsearch.materialize import save_pruned
    from tyrsearch.models import adapter_for
    from tyrsearch.pruner import OneShotConfig, one_shot
    from tyrsearch.search.knapsack import knapsack_prune
    from tyrsearch.space import load_space

    # everything a user can get wrong is checked before the model is loaded
    allocations.check_sparsity(sparsity)
    allocations.check_sparsity(attention_sparsity, flag="--attention-sparsity")
    make_criterion(criterion)
    if allocation not in (*allocations.ALLOCATIONS, "knapsack"):
        raise UserError(f"unknown allocation {allocation!r}: choose one of {', '.join(allocations.ALLOCATIONS)}, "
                        "knapsack")
    space = load_space(space_name) if space_name else None
    _check_out_dir(out_dir, overwrite=overwrite)
    sources = [texts.read_text(source) for source in texts.mixture(calib_source)]

    model, tokenizer = assets.load_model(model_ref)
    adapter = adapter_for(model)
    tokens = [data.tokenize(tokenizer, text) for text in sources]  # once, for calibration and sensitivity
    batches = data.mixed_batches(tokenizer, tokens, seq_len=seq_len, count=calib_seqs, seed=seed)
    before = {"params": evaluate.total_params(model), "decoder_params": evaluate.decoder_params(model)}
    if allocation == "knapsack":
        sensitivity = data.mixed_batches(tokenizer, tokens, seq_len=seq_len, count=sensitivity_seqs, seed=seed + 1)
        report = knapsack_prune(model, make_criterion(criterion, seed=seed), batches, sparsity=sparsity,
                                space=space or load_space(adapter.search_space), sensitivity_batches=sensitivity)
    else:
        config = OneShotConfig(criterion=criterion, sparsity=sparsity, allocation=allocation,
                               attention_sparsity=attention_sparsity, sequential=sequential, seed=seed)
        report = one_shot(model, config, batches, progress=True)
    result = {
        "model": model_ref,
        "out": str(out_dir),
        "params_before": before["params"], "params_after": evaluate.total_params(model),
        "decoder_params_before": before["decoder_params"], "decoder_params_after": evaluate.decoder_params(model),
        "calibration": {"source": calib_source, "sequences": calib_seqs, "seq_len": seq_len,
                        "tokens": int(batches.numel()), "seed": seed},
        **report,
    }
    save_pruned(model, tokenizer, out_dir, result=result)
    _emit(result, as_json)


LATENCY_SEQ_HELP = "prefill tokens of the latency workload (batch 1, logits of the last position)"


@cli.command("search")
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.option("--target", required=True, type=float,
              help="fraction in [0, 1) of the dense model's --budget to remove")
@click.option("--budget", default="params", show_default=True,
              help="what --target is a fraction of: params (decoder layers' prunable parameters), flops (per "
                   "token, lm_head included) or latency (ONNX Runtime prefill, estimated from this machine's "
                   "latency table)")
@click.option("--objectives", default="kl", show_default=True,
              help="kl, or kl and a cost (kl,latency; kl,params; kl,flops): NSGA-II over both, with the Pareto "
                   "front in result.json, report.html and the dashboard")
@click.option("--latency-seq-len", default=128, show_default=True, type=click.IntRange(min=2),
              help=f"latency budget or objective: {LATENCY_SEQ_HELP}")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="run folder: study.db (default storage), model/, result.json, report.html")
@click.option("--space", "space_name", default=None,
              help="search space name or YAML (default: the family's, e.g. llama)")
@click.option("--calib", "calib_source", default="c4,wiki", show_default=True, help=CALIB_HELP)
@click.option("--calib-seqs", default=32, show_default=True, type=click.IntRange(min=1),
              help="sequences of --seq-len tokens that calibrate the supernet")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--criterion", default="osscar", show_default=True,
              help="local criterion of the supernet: osscar, flap, wanda, taylor, magnitude, random")
@click.option("--strategy", default=None,
              help="evolution (Tyr / EvoPress, the default), tpe or cmaes, each keeping the budget; nsga2 (the "
                   "default with several --objectives)")
@click.option("--start", default="knapsack", show_default=True,
              help="first iteration's start: knapsack (per-layer sensitivities + a dynamic program) "
                   "or centre (uniform)")
@click.option("--sensitivity-seqs", default=2, show_default=True, type=click.IntRange(min=1),
              help="knapsack start: fitness sequences on which each layer variant's KL is measured")
@click.option("--storage", envvar="OPTUNA_STORAGE", default=None,
              help="Optuna storage URL, also from $OPTUNA_STORAGE (default: sqlite:///OUT/study.db; "
                   "postgresql://USER@HOST/DB for workers)")
@click.option("--study", "--study-name", "study_name", default=None,
              help="Optuna study name (default: MODEL-tTARGET, e.g. smollm2-135m-t0.3)")
@click.option("--runner", default="local", show_default=True, type=click.Choice(RUNNER_NAMES),
              help="local: this process evaluates; optuna: worker processes sharing --storage evaluate; "
                   "ray: Ray Tune trials on a Ray cluster evaluate")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=0),
              help="optuna: worker processes to spawn here (0: only those started with `tyrsearch worker`); "
                   "ray: Tune trials at once")
@click.option("--worker-threads", default=None, type=click.IntRange(min=1),
              help="optuna, ray: torch threads (ray: CPUs) per worker (default: cores / workers)")
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="ray runner: the cluster to use (HOST:PORT, also from $RAY_ADDRESS; default: start a local one)")
@click.option("--heartbeat", default=10, show_default=True, type=click.IntRange(min=1),
              help="seconds between worker heartbeats; a worker silent 3x as long has its trials retried")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="continue the study of an interrupted search in --out")
@click.option("--supernet-dir", default=None, type=click.Path(path_type=Path),
              help="where supernets are cached and reused (default: the tyrsearch cache)")
@click.option("--no-rebuild", is_flag=True, help="a corrupt cached supernet is an error instead of being rebuilt")
@click.option("--eval-tokens", default=0, show_default=True, type=click.IntRange(min=0),
              help="also measure the winner's perplexity on this many tokens of each --eval-text (0: skip)")
@click.option("--eval-text", default="wiki-summaries,literature,code,docs", show_default=True,
              help=f"held-out texts for --eval-tokens, joined by commas: {TEXT_HELP}")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def search_command(model_ref: str, target: float, budget: str, objectives: str, latency_seq_len: int,
                   out_dir: Path, space_name: str | None, calib_source: str,
                   calib_seqs: int, seq_len: int, criterion: str, strategy: str | None, start: str,
                   sensitivity_seqs: int, storage: str | None,
                   study_name: str | None, runner: str, workers: int, worker_threads: int | None,
                   address: str | None, heartbeat: int, seed: int, resume: bool, supernet_dir: Path | None,
                   no_rebuild: bool, eval_tokens: int, eval_text: str, as_json: bool) -> None:
    """Search how much to prune in each layer (coarse-to-fine evolution over a supernet, an Optuna study),
    then save the winner as an HF folder with result.json and report.html."""
    from tyrsearch import allocation as allocations
    from tyrsearch import assets, data, evaluate, texts
    from tyrsearch.budget import BUDGETS, limit, make_budget
    from tyrsearch.local import make_criterion
    from tyrsearch.materialize import save_pruned
    from tyrsearch.models import adapter_for
    from tyrsearch.pruner import dims_of
    from tyrsearch.runners import make_runner
    from tyrsearch.search.driver import (
        STARTS,
        Search,
        SearchConfig,
        check_reachable,
        materialize,
        objective_space,
        open_study,
        parse_objectives,
        uniform_centre,
    )
    from tyrsearch.search.job import JOB, Job
    from tyrsearch.search.report import RESULT, pareto_front, write_report
    from tyrsearch.search.samplers import STRATEGIES
    from tyrsearch.search.storage import open_storage, redact
    from tyrsearch.space import load_space

    allocations.check_sparsity(target, flag="--target")
    make_criterion(criterion)
    if budget not in BUDGETS:
        raise UserError(f"unknown --budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    goals = parse_objectives(objectives)
    strategy = strategy or ("nsga2" if len(goals) > 1 else "evolution")
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if (strategy == "nsga2") != (len(goals) > 1):
        raise UserError("--strategy nsga2 searches several --objectives (e.g. kl,latency) and they need it: "
                        "give both or neither")
    if runner == "ray" and len(goals) > 1:
        raise UserError("several --objectives run with --runner local or optuna (Ray Tune's OptunaSearch here "
                        "reports one metric)")
    if start not in STARTS:
        raise UserError(f"unknown start {start!r}: choose one of {', '.join(STARTS)}")
    space = load_space(space_name) if space_name else None
    if not resume:
        _check_out_dir(out_dir, overwrite=False)
    elif not out_dir.is_dir():
        raise UserError(f"--resume: {out_dir} does not exist; run the search without --resume first")
    storage_url = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    study_name = study_name or f"{Path(model_ref).name.removesuffix('.gguf')}-t{target:g}"
    job = Job.of(model=model_ref, calib=calib_source, calib_seqs=calib_seqs, seq_len=seq_len, seed=seed)
    run = make_runner(runner, storage_url=storage_url, study_name=study_name, workers=workers, threads=worker_threads,
                      heartbeat_s=heartbeat, address=address)
    for source in texts.mixture(calib_source):
        texts.read_text(source)  # a missing corpus or an unreachable database fails before the model loads
    held_out_texts = {name: texts.read_text(name) for name in texts.mixture(eval_text)} if eval_tokens else {}
    store = open_storage(storage_url, heartbeat_s=heartbeat) if storage else None
    model, tokenizer = assets.load_model(model_ref)
    adapter = adapter_for(model)
    space = objective_space(space or load_space(adapter.search_space), goals)
    dense = adapter.shapes(model)
    space.check_model(dense, adapter.unit_types)
    table = None
    if budget == "latency" or "latency" in goals:
        from tyrsearch.export.latency import Workload, table_for

        table, _ = table_for(model, Workload(seq_len=latency_seq_len))
    cost = make_budget(budget, dims=dims_of(model), seq_len=seq_len, vocab=model.config.vocab_size, table=table)
    check_reachable(space, dense, cost, target)
    config = SearchConfig(target=target, criterion=criterion, strategy=strategy, start=start, seed=seed,
                          budget=budget, objectives=goals, sensitivity_sequences=sensitivity_seqs,
                          no_rebuild=no_rebuild)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = store or open_storage(storage_url, heartbeat_s=heartbeat)  # the default SQLite file lives in --out
    study = open_study(storage=store, study_name=study_name, space=space, config=config, resume=resume)
    if study.user_attrs.get(JOB, job.to_dict()) != job.to_dict():
        raise UserError(f"study {study_name!r} searches another model or calibration: resume with the same "
                        "--model, --calib, --calib-seqs, --seq-len and --seed, or choose another --study")
    study.set_user_attr(JOB, job.to_dict())
    batches = job.batches(tokenizer, space)
    search = Search(model=model, calibration=batches.calibration, fitness_batches=batches.fitness,
                    validation_batches=batches.validation, space=space, config=config, study=study,
                    supernet_dir=supernet_dir or assets.cache_dir() / "supernets", budget=cost, latency=table)
    found = run.run(search)
    tic = time.perf_counter()
    pruned = materialize(model, found)
    shapes = adapter.shapes(pruned)
    result = {
        "model": model_ref, "target": target,
        "budget": {"name": budget, "dense": cost.total(dense), "limit": limit(cost, dense, target),
                   "winner": cost.total(shapes)},
        **({"latency_ms": {"dense": table.estimate(dense), "winner": table.estimate(shapes),
                           "seq_len": table.seq_len, "machine": table.machine}} if table else {}),
        "achieved_sparsity": allocations.sparsity_of(shapes, dense, search.dims),
        "params_before": evaluate.total_params(model), "params_after": evaluate.total_params(pruned),
        "decoder_params_before": evaluate.decoder_params(model),
        "decoder_params_after": evaluate.decoder_params(pruned),
        "fitness": {"metric": space.fitness.metric, "value": found.fitness, "tokens": space.selection[-1].tokens},
        "layers": [s.block_config() for s in shapes],
        "iterations": found.iterations,
        **({"workers": found.workers} if found.workers else {}),
        **({"pareto_front": pareto_front(study, goals)} if len(goals) > 1 else {}),
        "calibration": {"source": calib_source, "sequences": calib_seqs, "seq_len": seq_len, "seed": seed},
        "study": {"storage": redact(storage_url), "name": study_name, "trials": len(study.trials)},
        "config": {"criterion": criterion, "strategy": strategy, "start": start, "space": space.family,
                   "objectives": list(goals),
                   "runner": runner, "workers": workers if runner != "local" else 1},
    }
    save_pruned(pruned, tokenizer, out_dir / "model")
    times = {**found.times_s, "materialize": time.perf_counter() - tic}
    if eval_tokens:
        tic = time.perf_counter()
        result["held_out"] = {
            name: evaluate.perplexity(pruned, data.eval_batches(tokenizer, text, seq_len=seq_len,
                                                                 max_tokens=eval_tokens), progress=not as_json)
            for name, text in held_out_texts.items()}
        times["eval"] = time.perf_counter() - tic
    result["times_s"] = times
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    study.set_user_attr(RESULT, result)  # `tyrsearch report` renders the same page from the study alone
    write_report(out_dir / "report.html", study=study, result=result, dense=dense,
                 uniform=uniform_centre(dense, search.dims, result["achieved_sparsity"]))
    _emit(result, as_json)


STORAGE_HELP = "Optuna storage URL of the study, also from $OPTUNA_STORAGE (e.g. postgresql://USER@HOST/DB)"


@cli.command("worker")
@click.option("--storage", envvar="OPTUNA_STORAGE", required=True, help=STORAGE_HELP)
@click.option("--study", "--study-name", "study_name", required=True, help="the search's study name")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch threads (default: all cores)")
@click.option("--heartbeat", default=10, show_default=True, type=click.IntRange(min=1),
              help="seconds between heartbeats; a worker silent 3x as long has its trials retried by others")
@click.option("--wait", default=60, show_default=True, type=click.IntRange(min=0),
              help="seconds to wait for the search to create the study")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def worker_command(storage: str, study_name: str, threads: int | None, heartbeat: int, wait: int, quiet: bool,
                   as_json: bool) -> None:
    """Evaluate candidates of a search's study (started with `tyrsearch search --runner optuna`) until
    the search is done. Start as many as you like, on any machine that reaches the database and the
    model and supernet paths; rerun one that was killed and it carries on."""
    from tyrsearch.runners.optuna_workers import serve

    _emit(serve(storage_url=storage, study_name=study_name, heartbeat_s=heartbeat, threads=threads, wait_s=wait,
                progress=not quiet), as_json)


@cli.command("dashboard")
@click.option("--storage", envvar="OPTUNA_STORAGE", required=True, help=STORAGE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (127.0.0.1: this machine only)")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(min=1, max=65535))
def dashboard_command(storage: str, host: str, port: int) -> None:
    """Serve optuna-dashboard for the study storage: every candidate's fitness per selection stage, its
    per-layer allocation, parameters and FLOPs (user attrs), live while the search runs."""
    import optuna_dashboard

    from tyrsearch.search.storage import open_storage, redact

    store = open_storage(storage)
    click.echo(f"optuna-dashboard for {redact(storage)} on http://{host}:{port}/ (Ctrl-C stops it)", err=True)
    optuna_dashboard.run_server(store, host=host, port=port)


@cli.command("report")
@click.option("--storage", envvar="OPTUNA_STORAGE", required=True, help=STORAGE_HELP)
@click.option("--study", "--study-name", "study_name", required=True, help="the search's study name")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="the HTML file to write")
def report_command(storage: str, study_name: str, out_file: Path) -> None:
    """Write the search's report.html from its study, finished or still running (best so far)."""
    from tyrsearch.search.report import study_report
    from tyrsearch.search.storage import open_storage

    page = study_report(open_storage(storage), study_name)
    _check_out_dir(out_file.parent, overwrite=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_file)
    click.echo(str(out_file))


@cli.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="a model folder: pruned (per-layer shapes) or dense, of a supported family")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="the .onnx file to write; its folder receives the tokenizer, config and runtime.py")
@click.option("--kv-cache", is_flag=True, help="the decoder graph with past key/values (for generation)")
@click.option("--int8", is_flag=True, help="also write FILE.int8.onnx, verified too")
@click.option("--int8-method", default="dynamic", show_default=True,
              help="dynamic: int8 weights and activations (fast); weights: 8-bit weight-only (near lossless, slow)")
@click.option("--int8-smooth", default=0.75, show_default=True, type=float,
              help="dynamic int8: SmoothQuant strength for the MLP down projections' outliers (0: none)")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset (18 to 23)")
@click.option("--last-only", is_flag=True, help="prefill graph: logits of the last position only")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def export_command(model_dir: Path, out_file: Path, kv_cache: bool, int8: bool, int8_method: str, int8_smooth: float,
                   opset: int, last_only: bool, as_json: bool) -> None:
    """Export a model folder to ONNX and verify it in ONNX Runtime against torch (exit 1 if the
    verification fails, with its figures)."""
    from tyrsearch.export.onnx_export import ExportConfig, export

    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} not found: give a model folder (from `tyrsearch prune` or `search`)")
    config = ExportConfig(kv_cache=kv_cache, int8=int8, int8_method=int8_method, int8_smooth=int8_smooth,
                          opset=opset, last_only=last_only)
    report = export(model_dir, out_file, config)
    _emit(report, as_json)
    if not report["verified"]:
        click.echo(f"error: the export of {model_dir} did not verify; figures in {out_file.parent / 'export.json'}",
                   err=True)
        sys.exit(1)


@cli.command("latency")
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=2), help=LATENCY_SEQ_HELP)
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime intra-op threads (0: every core)")
@click.option("--mlp-step", default=128, show_default=True, type=click.IntRange(min=1),
              help="MLP widths measured: multiples of this (linear in between)")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=3), help="timed runs per probe")
@click.option("--check", "check_models", default=4, show_default=True, type=click.IntRange(min=0, max=4),
              help="whole models exported and measured against the estimate (dense, uniform 0.3 and 0.5, "
                   "a random per-layer plan)")
@click.option("--rebuild", is_flag=True, help="measure again even if this machine's table is cached")
@click.option("--out", "out_file", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="also write the table and the check to this JSON file")
@click.option("--seed", default=0, show_default=True, type=int, help="of the random per-layer plan")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def latency_command(model_ref: str, seq_len: int, threads: int, mlp_step: int, repeats: int, check_models: int,
                    rebuild: bool, out_file: Path | None, seed: int, as_json: bool) -> None:
    """Build (once per machine, then cached) the latency table of a model's blocks in ONNX Runtime, and check
    its estimates against whole exported models."""
    import random

    from tyrsearch import allocation, assets
    from tyrsearch.export.latency import Workload, cache_file, check, table_for
    from tyrsearch.models import adapter_for
    from tyrsearch.pruner import dims_of

    if out_file is not None and out_file.exists():
        raise UserError(f"--out {out_file} already exists: choose a new path or remove it")
    model, _ = assets.load_model(model_ref)
    adapter = adapter_for(model)
    workload = Workload(seq_len=seq_len, threads=threads, repeats=repeats, mlp_step=mlp_step)
    tic = time.perf_counter()
    table, cached = table_for(model, workload, rebuild=rebuild)
    built_s = time.perf_counter() - tic
    dense, dims = adapter.shapes(model), dims_of(model)
    rng = random.Random(seed)
    plans = {"dense": dense, "uniform 0.3": allocation.uniform(dense, sparsity=0.3, dims=dims),
             "uniform 0.5 (attention 0.5)": allocation.uniform(dense, sparsity=0.5, attention_sparsity=0.5, dims=dims),
             "random per-layer": [s.with_units("q_heads", rng.randint(0, s.q_per_kv))
                                  .with_units("mlp", rng.randint(0, s.intermediate)) for s in dense]}
    rows = check(model, table, dict(list(plans.items())[:check_models]), workload)
    result = {"model": model_ref, "table_file": str(cache_file(model, workload)), "cached": cached,
              "seconds": built_s, **table.to_dict(), "dense_estimate_ms": table.estimate(dense), "check": rows,
              "mean_abs_error": sum(abs(r["error"]) for r in rows) / len(rows) if rows else None}
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2) + "\n")
    _emit(result, as_json)


JOBS_ADDRESS_HELP = ("the Ray cluster's job server, http://HOST:8265 (its dashboard), also from "
                     "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS")


def _jobs(address: str):
    from tyrsearch.runners.ray_jobs import Jobs

    return Jobs(address)


def _finish_job(status: dict, as_json: bool) -> None:
    """Print a finished job's status; exit 1 unless it succeeded."""
    _emit(status, as_json)
    if status["status"] != "SUCCEEDED":
        sys.exit(1)


@cli.command("submit", context_settings={"ignore_unknown_options": True})
@click.option("--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"], required=True, help=JOBS_ADDRESS_HELP)
@click.option("--wait", is_flag=True, help="wait for the job to finish; exit 1 unless it succeeds")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit_command(address: str, wait: bool, as_json: bool, args: tuple[str, ...]) -> None:
    """Submit a tyrsearch command as a Ray Job and print its id, e.g.
    `tyrsearch submit --address http://HOST:8265 -- search --model ... --runner ray`."""
    jobs = _jobs(address)
    job_id = jobs.submit(list(args))
    if wait:
        _finish_job(jobs.wait(job_id), as_json)
    elif as_json:
        _emit({"job_id": job_id}, as_json)
    else:
        click.echo(job_id)


@cli.group("jobs")
def jobs_group() -> None:
    """Follow searches submitted with `tyrsearch submit`: status, logs, stop, list."""


@jobs_group.command("status")
@click.argument("job_id")
@click.option("--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"], required=True, help=JOBS_ADDRESS_HELP)
@click.option("--wait", is_flag=True, help="wait for the job to finish; exit 1 unless it succeeds")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def jobs_status_command(job_id: str, address: str, wait: bool, as_json: bool) -> None:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    jobs = _jobs(address)
    if wait:
        _finish_job(jobs.wait(job_id), as_json)
    else:
        _emit(jobs.status(job_id), as_json)


@jobs_group.command("logs")
@click.argument("job_id")
@click.option("--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"], required=True, help=JOBS_ADDRESS_HELP)
@click.option("--follow", is_flag=True, help="keep printing until the job ends")
def jobs_logs_command(job_id: str, address: str, follow: bool) -> None:
    """The job's output (stdout and stderr)."""
    jobs = _jobs(address)
    if follow:
        for chunk in jobs.follow(job_id):
            click.echo(chunk, nl=False)
    else:
        click.echo(jobs.logs(job_id), nl=False)


@jobs_group.command("stop")
@click.argument("job_id")
@click.option("--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"], required=True, help=JOBS_ADDRESS_HELP)
def jobs_stop_command(job_id: str, address: str) -> None:
    """Stop the job (its search can be continued later with `search --resume`)."""
    stopped = _jobs(address).stop(job_id)
    click.echo(f"{job_id}: {'stopping' if stopped else 'had already finished'}")


@jobs_group.command("list")
@click.option("--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"], required=True, help=JOBS_ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="print one JSON list on stdout")
def jobs_list_command(address: str, as_json: bool) -> None:
    """Every job the cluster knows, oldest first."""
    listed = _jobs(address).list()
    if as_json:
        click.echo(json.dumps(listed))
    for job in [] if as_json else listed:
        click.echo(f"{job['job_id']}  {job['status']:<9}  {job['entrypoint']}")


@cli.command("stun")
@click.option("--model", "model_ref", required=True,
              help=f"a Mixture-of-Experts model (Mixtral, Qwen2-MoE, OLMoE; e.g. from `tyrsearch moefy`): {MODEL_HELP}")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for the pruned HF model and result.json")
@click.option("--experts-keep", default=None,
              help="routed experts kept over all MoE layers: a share (0.75) or a count (24); not with --method none")
@click.option("--sparsity", type=float, default=None,
              help="total sparsity in [0, 1): the fraction of the decoder's counted weights (attention q/k/v/o, "
                   "routers, routed experts; not embeddings, lm_head, norms, shared experts) removed or zero; "
                   "removed experts count as removed, the unstructured stage zeroes the rest")
@click.option("--method", default="stun", show_default=True,
              help="expert stage: stun (cluster by co-selection), frequency (drop the least used), random, none")
@click.option("--unstructured", default="wanda", show_default=True,
              help="second stage: wanda (|W| x ||x|| per output row), owl (outlier-weighted layer sparsities), none")
@click.option("--semi-structured", is_flag=True,
              help="2:4 in every pruned matrix (wanda scores) instead of a --sparsity target")
@click.option("--router-weight", default=0.0, show_default=True, type=float,
              help="stun: weight in [0, 1] of the router-row distance mixed into the co-selection distance")
@click.option("--merge", is_flag=True, help="stun: average each 2-expert cluster instead of keeping one of them")
@click.option("--calib", "calib_source", default="c4,wiki", show_default=True, help=CALIB_HELP)
@click.option("--calib-seqs", default=32, show_default=True, type=click.IntRange(min=1),
              help="calibration sequences of --seq-len tokens (one forward pass over them)")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--eval-tokens", default=0, show_default=True, type=click.IntRange(min=0),
              help="also measure the pruned model's wiki-summaries perplexity on this many tokens (0: skip)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def stun_command(model_ref: str, out_dir: Path, experts_keep: str | None, sparsity: float | None, method: str,
                 unstructured: str, semi_structured: bool, router_weight: float, merge: bool, calib_source: str,
                 calib_seqs: int, seq_len: int, seed: int, eval_tokens: int, as_json: bool) -> None:
    """STUN for Mixture-of-Experts models: remove whole experts (chosen by how alike they behave), then prune
    the rest unstructured (zeros in dense weights) to a total sparsity; save the model as an HF folder."""
    from tyrsearch import assets, data, evaluate, texts
    from tyrsearch.materialize import save_pruned
    from tyrsearch.moe.stun import StunConfig, check_config, parse_keep, stun_prune

    config = StunConfig(experts_keep=parse_keep(experts_keep) if experts_keep is not None else None,
                        sparsity=sparsity, method=method, unstructured=unstructured, semi_structured=semi_structured,
                        router_weight=router_weight, merge=merge, seed=seed)
    _check_out_dir(out_dir, overwrite=False)
    sources = [texts.read_text(source) for source in texts.mixture(calib_source)]
    model, tokenizer = assets.load_model(model_ref)
    check_config(model, config)  # every other mistake, before the calibration pass
    batches = data.mixed_batches(tokenizer, sources, seq_len=seq_len, count=calib_seqs, seed=seed)
    before = {"params": evaluate.total_params(model), "decoder_params": evaluate.decoder_params(model)}
    report = stun_prune(model, batches, config=config, progress=not as_json)
    result = {
        "model": model_ref, "out": str(out_dir),
        "achieved_sparsity": report["sparsity"]["total"], "experts_kept": report["experts"]["total_kept"],
        "params_before": before["params"], "params_after": evaluate.total_params(model),
        "decoder_params_before": before["decoder_params"], "decoder_params_after": evaluate.decoder_params(model),
        **report,
        "calibration": {"source": calib_source, "seq_len": seq_len, "seed": seed, **report["calibration"]},
    }
    if eval_tokens:
        tic = time.perf_counter()
        held_out = data.eval_batches(tokenizer, texts.read_text("wiki-summaries"), seq_len=seq_len,
                                     max_tokens=eval_tokens)
        result["held_out"] = {"text": "wiki-summaries", **evaluate.perplexity(model, held_out, progress=not as_json)}
        result["time_s"]["eval"] = time.perf_counter() - tic
    save_pruned(model, tokenizer, out_dir, result=result)
    _emit(result, as_json)


@cli.group("meta")
def meta_group() -> None:
    """Meta-pruning with a graph metanetwork, for vision networks trained here on Fashion-MNIST: build a
    zoo of networks, meta-train the metanetwork on it, prune a network with it."""


def _meta_out(out_dir: Path, *, resume: bool, overwrite: bool = False) -> None:
    if not resume:
        _check_out_dir(out_dir, overwrite=overwrite)
    elif not out_dir.is_dir():
        raise UserError(f"--resume: {out_dir} does not exist; run without --resume first")


@meta_group.command("zoo")
@click.option("--arch", required=True, type=click.Choice(["resnet", "vit"]),
              help="ResNet-style CNNs (BatchNorm, residual blocks) or small ViTs (transformers' ViT)")
@click.option("--count", required=True, type=click.IntRange(min=1), help="networks to train")
@click.option("--holdout", default=None, type=click.IntRange(min=0),
              help="the last N networks are held out of meta-training, for the benchmark (default: a fifth)")
@click.option("--widths", default=None,
              help="comma-separated base widths the networks cycle through (ResNet: first stage's channels, "
                   "doubled per stage; ViT: hidden size, a multiple of its 4 heads) [default: 8,12,16 / 24,32,40]")
@click.option("--epochs", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--train-images", default=None, type=click.IntRange(min=1),
              help="train on the first N training images only (default: all 60000)")
@click.option("--test-images", default=None, type=click.IntRange(min=1),
              help="measure test accuracy on the first N test images only (default: all 10000)")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="the zoo folder")
@click.option("--resume", is_flag=True, help="continue an interrupted zoo in --out (same options)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def meta_zoo_command(arch: str, count: int, holdout: int | None, widths: str | None, epochs: float, batch_size: int,
                     lr: float, train_images: int | None, test_images: int | None, out_dir: Path, resume: bool,
                     quiet: bool, as_json: bool) -> None:
    """Train a zoo of networks on Fashion-MNIST (seeds 0.., cycling widths); save each with its accuracy."""
    from tyrsearch.meta.zoo import ZOO_WIDTHS, ZooConfig, build_zoo

    try:
        parsed = tuple(int(w) for w in widths.split(",")) if widths else ZOO_WIDTHS[arch]
    except ValueError:
        raise UserError(f"--widths {widths!r} is not a comma-separated list of integers, e.g. 8,12,16") from None
    config = ZooConfig(arch=arch, count=count, holdout=count // 5 if holdout is None else holdout, widths=parsed,
                       epochs=epochs, batch_size=batch_size, lr=lr, train_images=train_images,
                       test_images=test_images)
    _meta_out(out_dir, resume=resume)
    tic = time.perf_counter()
    zoo = build_zoo(config, out_dir, progress=not quiet)
    _emit({"out": str(out_dir), "arch": arch, "networks": len(zoo["nets"]),
           "train": sum(n["split"] == "train" for n in zoo["nets"]),
           "test": sum(n["split"] == "test" for n in zoo["nets"]),
           "test_accuracy": {n["name"]: n["test_accuracy"] for n in zoo["nets"]},
           "seconds": round(time.perf_counter() - tic, 1)}, as_json)


@meta_group.command("train")
@click.option("--zoo", "zoo_dir", required=True, type=click.Path(path_type=Path),
              help="a zoo from `tyrsearch meta zoo` (its train networks are used)")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for metanet.safetensors, meta.json and the checkpoint")
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="images per step")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--sparsity-weight", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="weight of the group-lasso regulariser (1.0 = the input network's own value)")
@click.option("--hidden", default=32, show_default=True, type=click.IntRange(min=1), help="metanetwork width")
@click.option("--layers", default=3, show_default=True, type=click.IntRange(min=1),
              help="metanetwork message-passing layers")
@click.option("--train-images", default=None, type=click.IntRange(min=1),
              help="the first N training images only (default: all 60000)")
@click.option("--checkpoint-every", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="continue from the checkpoint in --out (same options)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def meta_train_command(zoo_dir: Path, out_dir: Path, steps: int, batch_size: int, lr: float, sparsity_weight: float,
                       hidden: int, layers: int, train_images: int | None, checkpoint_every: int, seed: int,
                       resume: bool, quiet: bool, as_json: bool) -> None:
    """Meta-train the metanetwork: rewritten zoo networks keep their accuracy while their channel / head
    groups become prunable (cross-entropy + group lasso, through torch.func.functional_call)."""
    from tyrsearch.meta.train import MetaTrainConfig, train_on_zoo
    from tyrsearch.meta.zoo import read_zoo

    read_zoo(zoo_dir)  # a wrong --zoo fails before anything is written
    _meta_out(out_dir, resume=resume)
    config = MetaTrainConfig(steps=steps, batch_size=batch_size, lr=lr, sparsity_weight=sparsity_weight,
                             checkpoint_every=checkpoint_every, seed=seed, warmup=min(100, steps // 10))
    info = train_on_zoo(zoo_dir, out_dir, config=config, hidden=hidden, layers=layers, train_images=train_images,
                        progress=not quiet)
    last = info["history"][-1]
    _emit({"out": str(out_dir), "arch": info["arch"], "nets": len(info["nets"]), "steps": steps,
           "ce": last["ce"], "sparsity": last["sparsity"], "seconds": round(info["seconds"], 1)}, as_json)


@meta_group.command("prune")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="a saved network (a zoo's net-NNN folder, or an earlier output)")
@click.option("--meta", "meta_dir", default=None, type=click.Path(path_type=Path),
              help="a metanetwork from `tyrsearch meta train` (needed by --method meta)")
@click.option("--method", default="meta", show_default=True, type=click.Choice(["meta", "l2", "random"]),
              help="meta: rewrite, fine-tune, group-L2 prune, fine-tune; l2 / random: prune, fine-tune")
@click.option("--speedup", default=2.0, show_default=True, type=float, help="dense FLOPs / pruned FLOPs, at least")
@click.option("--rewrite-steps", default=300, show_default=True, type=click.IntRange(min=0),
              help="fine-tuning steps after the rewrite (the other methods add them to --finetune-steps)")
@click.option("--finetune-steps", default=600, show_default=True, type=click.IntRange(min=0),
              help="fine-tuning steps after pruning")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--train-images", default=None, type=click.IntRange(min=1),
              help="fine-tune on the first N training images only (default: all 60000)")
@click.option("--test-images", default=None, type=click.IntRange(min=1),
              help="measure accuracy on the first N test images only (default: all 10000)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for the pruned network (model.safetensors, net.json) and result.json")
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def meta_prune_command(model_dir: Path, meta_dir: Path | None, method: str, speedup: float, rewrite_steps: int,
                       finetune_steps: int, batch_size: int, lr: float, train_images: int | None,
                       test_images: int | None, seed: int, out_dir: Path, overwrite: bool, quiet: bool,
                       as_json: bool) -> None:
    """Prune a network structurally to a FLOPs speedup (channels of CNNs; heads and MLP channels of ViTs)
    and fine-tune it; with --method meta, the metanetwork rewrites it first."""
    from tyrsearch.meta import data
    from tyrsearch.meta.prune import PruneConfig, check_reachable, run
    from tyrsearch.meta.train import load_metanet
    from tyrsearch.meta.zoo import load_net, save_net

    config = PruneConfig(speedup=speedup, method=method, rewrite_steps=rewrite_steps, finetune_steps=finetune_steps,
                         batch_size=batch_size, lr=lr, seed=seed)
    if method == "meta" and meta_dir is None:
        raise UserError("--method meta needs --meta FOLDER (a metanetwork from `tyrsearch meta train`); or choose "
                        "--method l2 or random")
    model, net_config, info = load_net(model_dir)
    check_reachable(net_config, speedup)
    metanet = load_metanet(meta_dir)[0] if method == "meta" else None
    _check_out_dir(out_dir, overwrite=overwrite)
    train, test = data.load("train", limit=train_images), data.load("test", limit=test_images)
    pruned, pruned_config, report = run(model, net_config, train=train, test=test, prune=config, metanet=metanet,
                                        progress=not quiet)
    result = {"model": str(model_dir), "meta": str(meta_dir) if metanet else None, "out": str(out_dir), **report}
    save_net(out_dir, pruned, pruned_config,
             {"test_accuracy": report["test_accuracy"]["final"], "pruned_from": str(model_dir)}, result=result)
    _emit(result, as_json)


@cli.command("moefy")
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.option("--experts", required=True, type=int, help="experts per layer; each gets an equal share of MLP neurons")
@click.option("--top-k", "top_k", required=True, type=int, help="experts active per token")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for the Mixtral HF model and result.json")
@click.option("--calibration", "--calib", "calib_source", default="c4", show_default=True, help=TEXT_HELP)
@click.option("--calibration-sequences", "--calib-seqs", "calib_seqs", default=64, show_default=True,
              type=click.IntRange(min=1), help="calibration sequences of --seq-len tokens")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--eval-text", default="wiki-summaries", show_default=True,
              help=f"held-out text for the dense and MoE perplexity: {TEXT_HELP}")
@click.option("--eval-tokens", default=16384, show_default=True, type=click.IntRange(min=0),
              help="tokens of --eval-text on which both perplexities are measured (0: skip)")
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def moefy_command(model_ref: str, experts: int, top_k: int, out_dir: Path, calib_source: str, calib_seqs: int,
                  seq_len: int, seed: int, eval_text: str, eval_tokens: int, overwrite: bool, as_json: bool) -> None:
    """Split each MLP of a dense Llama-family model into experts with a fitted router (MoEfication) and
    save the result as a Mixtral model; report its held-out perplexity next to the dense model's."""
    from tyrsearch import assets, data, evaluate, texts
    from tyrsearch.moe import active_params, check_counts, check_moefiable, moefy, save_moe

    # everything a user can get wrong is checked before the long work
    check_counts(experts=experts, top_k=top_k)
    _check_out_dir(out_dir, overwrite=overwrite)
    calib = texts.read_text(calib_source)
    held_out = texts.read_text(eval_text) if eval_tokens else None
    model, tokenizer = assets.load_model(model_ref)
    check_moefiable(model.config, experts=experts, top_k=top_k)
    batches = data.calibration_batches(tokenizer, calib, seq_len=seq_len, count=calib_seqs, seed=seed)
    eval_batches = None
    if held_out is not None:
        eval_batches = data.eval_batches(tokenizer, held_out, seq_len=seq_len, max_tokens=eval_tokens)

    start = time.perf_counter()
    moe = moefy(model, batches, experts=experts, top_k=top_k, seed=seed)
    result = {
        "model": model_ref, "out": str(out_dir), "experts": experts, "top_k": top_k,
        "params": evaluate.total_params(moe), "active_params": active_params(moe),
        "active_fraction": round(active_params(moe) / evaluate.total_params(moe), 4),
        "dense_params": evaluate.total_params(model),
        "calibration": {"source": calib_source, "sequences": calib_seqs, "seq_len": seq_len,
                        "tokens": int(batches.numel()), "seed": seed},
        "moefy_s": round(time.perf_counter() - start, 1),
    }
    if eval_batches is not None:
        start = time.perf_counter()
        dense_ppl = evaluate.perplexity(model, eval_batches)["ppl"]
        moe_eval = evaluate.perplexity(moe, eval_batches)
        result.update({"eval_text": eval_text, "eval_tokens": moe_eval["tokens"], "dense_ppl": dense_ppl,
                       "moe_ppl": moe_eval["ppl"], "ppl_ratio": moe_eval["ppl"] / dense_ppl,
                       "eval_s": round(time.perf_counter() - start, 1)})
    save_moe(moe, tokenizer, out_dir, result=result)
    _emit(result, as_json)


@cli.command("distill")
@click.option("--teacher", "teacher_ref", required=True,
              help=f"the dense model the student was made from: {MODEL_HELP}")
@click.option("--student", "student_ref", required=True, help="the moefied or pruned model folder to train")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for the trained student and result.json; checkpoints go to OUT.checkpoints/ meanwhile")
@click.option("--steps", default=500, show_default=True, type=click.IntRange(min=1), help="optimizer steps")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="windows per step")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=2), help="tokens per window")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="peak learning rate (AdamW, linear warmup, cosine decay)")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0), help="warmup steps")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="softmax temperature of both distributions (the loss is scaled by its square)")
@click.option("--train", default="mlp", show_default=True, type=click.Choice(["mlp", "all"]),
              help="mlp: only the MLP / MoE blocks (experts and routers) train; all: every weight")
@click.option("--text", "text_source", default="c4", show_default=True, help=f"training text: {TEXT_HELP}")
@click.option("--save-every", default=50, show_default=True, type=click.IntRange(min=1),
              help="steps between checkpoints (a rerun resumes from the last)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--eval-text", default="wiki-summaries", show_default=True,
              help=f"held-out text for the perplexities before and after: {TEXT_HELP}")
@click.option("--eval-tokens", default=16384, show_default=True, type=click.IntRange(min=0),
              help="tokens of --eval-text (0: skip)")
@click.option("--overwrite", is_flag=True, help="replace --out and drop OUT.checkpoints/ (start over)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def distill_command(teacher_ref: str, student_ref: str, out_dir: Path, steps: int, batch_size: int, seq_len: int,
                    lr: float, warmup: int, temperature: float, train: str, text_source: str, save_every: int,
                    seed: int, eval_text: str, eval_tokens: int, overwrite: bool, as_json: bool) -> None:
    """Train a moefied or pruned student to match its dense teacher's next-token distributions (KL), on
    --text, with checkpoints: interrupted, the same command resumes where it stopped."""
    import contextlib
    import shutil

    from tyrsearch import assets, data, evaluate, texts
    from tyrsearch.distill import DistillConfig, check_pair, check_resumable, distill, save_student

    _check_out_dir(out_dir, overwrite=overwrite)
    checkpoints = out_dir.with_name(out_dir.name + ".checkpoints")
    config = DistillConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, temperature=temperature,
                           train=train, save_every=save_every, seed=seed)
    student_dir = assets.resolve_model(student_ref)
    settings = {"teacher": teacher_ref, "student": str(student_dir), "text": text_source, "seq_len": seq_len}
    if not overwrite:
        check_resumable(checkpoints, config, settings)  # before the long work, not after the first evaluations
    text = texts.read_text(text_source)
    held_out = texts.read_text(eval_text) if eval_tokens else None
    teacher, tokenizer = assets.load_model(teacher_ref)
    student, _ = assets.load_model(str(student_dir))
    check_pair(teacher, student)
    windows = data.eval_batches(tokenizer, text, seq_len=seq_len, max_tokens=len(text) + seq_len)  # all of it
    if windows.shape[0] < batch_size:
        raise UserError(f"--text {text_source} holds {windows.shape[0]} windows of {seq_len} tokens, fewer than "
                        f"--batch-size {batch_size}: give more text or a smaller --seq-len / --batch-size")
    if overwrite and checkpoints.exists():  # only once the input is known to be good
        shutil.rmtree(checkpoints)
    eval_batches = data.eval_batches(tokenizer, held_out, seq_len=512, max_tokens=eval_tokens) if held_out else None
    result = {"teacher": teacher_ref, "student": str(student_dir), "out": str(out_dir), "steps": steps,
              "train_tokens": steps * batch_size * seq_len, "text": text_source, "text_windows": windows.shape[0]}
    if eval_batches is not None:
        result.update(eval_text=eval_text, teacher_ppl=evaluate.perplexity(teacher, eval_batches)["ppl"],
                      student_ppl_before=evaluate.perplexity(student, eval_batches)["ppl"])
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs; stdout carries only the result
        history = distill(teacher, student, windows, checkpoints, config=config, settings=settings)
    result["train_s"] = round(time.perf_counter() - start, 1)  # this run's share, when resumed
    result["loss"] = [{"step": row["step"], "loss": row["loss"]} for row in history if "loss" in row]
    if eval_batches is not None:
        after = evaluate.perplexity(student, eval_batches)["ppl"]
        result.update(student_ppl=after, ppl_ratio_before=result["student_ppl_before"] / result["teacher_ppl"],
                      ppl_ratio=after / result["teacher_ppl"])
    save_student(student, student_dir, out_dir, result=result)
    shutil.rmtree(checkpoints)
    _emit(result, as_json)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import optuna

    # heartbeats and their retry callback are marked experimental in Optuna; they are what we rely on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show the long work; loading bars would bury errors
    try:
        cli.main(args=argv, prog_name="tyrsearch", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "tyrsearch"
        click.echo(f"error: {exc.format_message()} (see `{command} --help`)", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

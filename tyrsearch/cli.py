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
TEXT_HELP = "a corpus (c4, wiki, wiki-summaries) or a UTF-8 text file"


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
    from tyrsearch import assets, data, evaluate

    text = assets.read_text(text_source)
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
@click.option("--calib", "calib_source", default="c4", show_default=True, help=TEXT_HELP)
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
    from tyrsearch import assets, data, evaluate
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
    text = assets.read_text(calib_source)

    model, tokenizer = assets.load_model(model_ref)
    adapter = adapter_for(model)
    tokens = data.tokenize(tokenizer, text)  # once, for the calibration and the sensitivity samples
    batches = data.calibration_batches(tokenizer, tokens, seq_len=seq_len, count=calib_seqs, seed=seed)
    before = {"params": evaluate.total_params(model), "decoder_params": evaluate.decoder_params(model)}
    if allocation == "knapsack":
        sensitivity = data.calibration_batches(tokenizer, tokens, seq_len=seq_len, count=sensitivity_seqs,
                                               seed=seed + 1)
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


@cli.command("search")
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.option("--target", required=True, type=float,
              help="fraction in [0, 1) of the decoder layers' prunable parameters to remove")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="run folder: study.db (default storage), model/, result.json, report.html")
@click.option("--space", "space_name", default=None,
              help="search space name or YAML (default: the family's, e.g. llama)")
@click.option("--calib", "calib_source", default="c4", show_default=True, help=TEXT_HELP)
@click.option("--calib-seqs", default=32, show_default=True, type=click.IntRange(min=1),
              help="sequences of --seq-len tokens that calibrate the supernet")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--criterion", default="osscar", show_default=True,
              help="local criterion of the supernet: osscar, flap, wanda, taylor, magnitude, random")
@click.option("--strategy", default="evolution", show_default=True,
              help="evolution (Tyr / EvoPress), tpe or cmaes; each keeps the budget exact")
@click.option("--start", default="knapsack", show_default=True,
              help="first iteration's start: knapsack (per-layer sensitivities + a dynamic program) "
                   "or centre (uniform)")
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
              help="also measure the winner's wiki-summaries perplexity on this many tokens (0: skip)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def search_command(model_ref: str, target: float, out_dir: Path, space_name: str | None, calib_source: str,
                   calib_seqs: int, seq_len: int, criterion: str, strategy: str, start: str, storage: str | None,
                   study_name: str | None, runner: str, workers: int, worker_threads: int | None,
                   address: str | None, heartbeat: int, seed: int, resume: bool, supernet_dir: Path | None,
                   no_rebuild: bool, eval_tokens: int, as_json: bool) -> None:
    """Search how much to prune in each layer (coarse-to-fine evolution over a supernet, an Optuna study),
    then save the winner as an HF folder with result.json and report.html."""
    from tyrsearch import allocation as allocations
    from tyrsearch import assets, data, evaluate
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
        open_study,
        uniform_centre,
    )
    from tyrsearch.search.job import JOB, Job
    from tyrsearch.search.report import RESULT, write_report
    from tyrsearch.search.samplers import STRATEGIES
    from tyrsearch.search.storage import open_storage, redact
    from tyrsearch.space import load_space

    allocations.check_sparsity(target, flag="--target")
    make_criterion(criterion)
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
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
    assets.read_text(calib_source)  # a missing corpus or an unreachable database fails before the model loads
    store = open_storage(storage_url, heartbeat_s=heartbeat) if storage else None
    model, tokenizer = assets.load_model(model_ref)
    adapter = adapter_for(model)
    space = space or load_space(adapter.search_space)
    dense = adapter.shapes(model)
    space.check_model(dense, adapter.unit_types)
    check_reachable(space, dense, dims_of(model), target)
    config = SearchConfig(target=target, criterion=criterion, strategy=strategy, start=start, seed=seed,
                          no_rebuild=no_rebuild)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = store or open_storage(storage_url, heartbeat_s=heartbeat)  # the default SQLite file lives in --out
    study = open_study(storage=store, study_name=study_name, space=space, config=config, resume=resume)
    if study.user_attrs.get(JOB, job.to_dict()) != job.to_dict():
        raise UserError(f"study {study_name!r} searches another model or calibration: resume with the same "
                        "--model, --calib, --calib-seqs, --seq-len and --seed, or choose another --study")
    study.set_user_attr(JOB, job.to_dict())
    calibration, fitness_batches = job.batches(tokenizer, space)
    search = Search(model=model, calibration=calibration, fitness_batches=fitness_batches, space=space,
                    config=config, study=study, supernet_dir=supernet_dir or assets.cache_dir() / "supernets")
    found = run.run(search)
    tic = time.perf_counter()
    pruned = materialize(model, found)
    shapes = adapter.shapes(pruned)
    result = {
        "model": model_ref, "target": target,
        "achieved_sparsity": allocations.sparsity_of(shapes, dense, search.dims),
        "params_before": evaluate.total_params(model), "params_after": evaluate.total_params(pruned),
        "decoder_params_before": evaluate.decoder_params(model),
        "decoder_params_after": evaluate.decoder_params(pruned),
        "fitness": {"metric": space.fitness.metric, "value": found.fitness, "tokens": space.selection[-1].tokens},
        "layers": [s.block_config() for s in shapes],
        "iterations": found.iterations,
        **({"workers": found.workers} if found.workers else {}),
        "calibration": {"source": calib_source, "sequences": calib_seqs, "seq_len": seq_len, "seed": seed},
        "study": {"storage": redact(storage_url), "name": study_name, "trials": len(study.trials)},
        "config": {"criterion": criterion, "strategy": strategy, "start": start, "space": space.family,
                   "runner": runner, "workers": workers if runner != "local" else 1},
    }
    save_pruned(pruned, tokenizer, out_dir / "model")
    times = {**found.times_s, "materialize": time.perf_counter() - tic}
    if eval_tokens:
        tic = time.perf_counter()
        held_out = data.eval_batches(tokenizer, assets.read_text("wiki-summaries"), seq_len=seq_len,
                                     max_tokens=eval_tokens)
        result["held_out"] = {"text": "wiki-summaries", **evaluate.perplexity(pruned, held_out)}
        times["eval"] = time.perf_counter() - tic
    result["times_s"] = times
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    study.set_user_attr(RESULT, result)  # `tyrsearch report` renders the same page from the study alone
    write_report(out_dir / "report.html", study=study, result=result, dense=dense,
                 uniform=uniform_centre(dense, search.dims, target))
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
              help="dynamic: int8 weights and activations (fastest, lossy); weights: 8-bit weight-only (near lossless)")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset (18 to 23)")
@click.option("--last-only", is_flag=True, help="prefill graph: logits of the last position only")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def export_command(model_dir: Path, out_file: Path, kv_cache: bool, int8: bool, int8_method: str, opset: int,
                   last_only: bool, as_json: bool) -> None:
    """Export a model folder to ONNX and verify it in ONNX Runtime against torch (exit 1 if the
    verification fails, with its figures)."""
    from tyrsearch.export.onnx_export import ExportConfig, export

    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} not found: give a model folder (from `tyrsearch prune` or `search`)")
    config = ExportConfig(kv_cache=kv_cache, int8=int8, int8_method=int8_method, opset=opset, last_only=last_only)
    report = export(model_dir, out_file, config)
    _emit(report, as_json)
    if not report["verified"]:
        click.echo(f"error: the export of {model_dir} did not verify; figures in {out_file.parent / 'export.json'}",
                   err=True)
        sys.exit(1)


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

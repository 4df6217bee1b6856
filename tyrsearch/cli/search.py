"""`tyrsearch search`, and what serves a search's study: `worker`, `report`, `dashboard`."""

from __future__ import annotations

from pathlib import Path

import click

from tyrsearch.cli import options
from tyrsearch.runners import RUNNERS

LATENCY_SEQ_HELP = "prefill tokens of the latency workload (batch 1, logits of the last position)"


@click.command("search")
@options.model()
@click.option("--target", required=True, type=float, help="fraction in [0, 1) of the dense model's --budget to remove")
@click.option("--budget", default="params", show_default=True,
              help="what --target is a fraction of: params (decoder layers' prunable parameters), flops (per "
                   "token, lm_head included) or latency (ONNX Runtime prefill, estimated from this machine's "
                   "latency table)")
@click.option("--objectives", default="kl", show_default=True,
              help="kl, or kl and a cost (kl,latency; kl,params; kl,flops): NSGA-II over both, with the Pareto "
                   "front in result.json, report.html and the dashboard")
@click.option("--latency-seq-len", default=128, show_default=True, type=click.IntRange(min=2),
              help=f"latency budget or objective: {LATENCY_SEQ_HELP}")
@options.out_dir("run folder: study.db (default storage), model/, result.json, report.html")
@click.option("--space", default=None, help="search space name or YAML (default: the family's, e.g. llama)")
@options.calibration(seqs=32, seqs_help="sequences of --seq-len tokens that calibrate the supernet")
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
@options.storage(required=False, help="Optuna storage URL, also from $OPTUNA_STORAGE (default: "
                 "sqlite:///OUT/study.db; postgresql://USER@HOST/DB for workers)")
@options.study(required=False, help="Optuna study name (default: MODEL-tTARGET, e.g. smollm2-135m-t0.3)")
@click.option("--runner", default="local", show_default=True, type=click.Choice(RUNNERS),
              help="local: this process evaluates; optuna: worker processes sharing --storage evaluate; "
                   "ray: Ray Tune trials on a Ray cluster evaluate")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="optuna: worker processes to spawn here, one GPU each on a GPU machine (0: only those started "
                   "with `tyrsearch worker`); ray: Tune trials at once (default: the GPU count, 1 without GPUs)")
@click.option("--worker-threads", default=None, type=click.IntRange(min=1),
              help="optuna, ray: torch threads (ray: CPUs) per worker (default: cores / workers)")
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="ray runner: the cluster to use (HOST:PORT, also from $RAY_ADDRESS; default: start a local one)")
@click.option("--heartbeat", default=10, show_default=True, type=click.IntRange(min=1),
              help="seconds between worker heartbeats; a worker silent 3x as long has its trials retried")
@options.seed()
@click.option("--resume", is_flag=True, help="continue the study of an interrupted search in --out")
@click.option("--supernet-dir", default=None, type=click.Path(path_type=Path),
              help="where supernets are cached and reused (default: the tyrsearch cache)")
@click.option("--no-rebuild", is_flag=True, help="a corrupt cached supernet is an error instead of being rebuilt")
@options.held_out(tokens=0)
@options.heal()
@click.option("--heal-candidates", default=0, show_default=True, type=click.IntRange(min=0),
              help="healing-aware selection: heal the K best distinct candidates briefly, keep the one closest to "
                   "the dense model on held-back tokens (needs --heal-steps)")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="reach --target in R searches, each healed (--heal-steps) and each starting from the last one's "
                   "model: OUT/round-R/, OUT/model the last")
@click.option("--heal-select-steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="--heal-candidates: steps of each candidate's brief heal")
@options.placement(what="the search process's model (workers: `tyrsearch worker --device`)")
@options.as_json()
def search_command(model_ref: str, out_dir: Path, as_json: bool, **settings) -> None:
    """Search how much to prune in each layer (coarse-to-fine evolution over a supernet, an Optuna study),
    then save the winner as an HF folder with result.json and report.html."""
    from tyrsearch import api

    options.emit(api.search(model_ref, out=out_dir, progress=not as_json, **settings).to_json(), as_json)


@click.command("worker")
@options.storage(required=True)
@options.study(required=True)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch threads (default: all cores)")
@click.option("--heartbeat", default=10, show_default=True, type=click.IntRange(min=1),
              help="seconds between heartbeats; a worker silent 3x as long has its trials retried by others")
@click.option("--wait", default=60, show_default=True, type=click.IntRange(min=0),
              help="seconds to wait for the search to create the study")
@click.option("--device", default="auto", show_default=True,
              help="where this worker evaluates: auto, cpu, cuda, cuda:N (the dtype is the search's)")
@options.quiet("no progress bar")
@options.as_json()
def worker_command(storage: str, study_name: str, threads: int | None, heartbeat: int, wait: int, device: str,
                   quiet: bool, as_json: bool) -> None:
    """Evaluate candidates of a search's study (started with `tyrsearch search --runner optuna`) until
    the search is done. Start as many as you like, on any machine that reaches the database and the
    model and supernet paths; rerun one that was killed and it carries on."""
    from tyrsearch.runners.optuna_workers import serve

    options.emit(serve(storage_url=storage, study_name=study_name, heartbeat_s=heartbeat, threads=threads,
                       wait_s=wait, device=device, progress=not quiet), as_json)


@click.command("dashboard")
@options.storage(required=True)
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


@click.command("report")
@options.storage(required=True)
@options.study(required=True)
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="the HTML file to write")
def report_command(storage: str, study_name: str, out_file: Path) -> None:
    """Write the search's report.html from its study, finished or still running (best so far)."""
    from tyrsearch.api import check_out_dir
    from tyrsearch.atomic import write_text
    from tyrsearch.search.report import study_report
    from tyrsearch.search.storage import open_storage

    page = study_report(open_storage(storage), study_name)
    check_out_dir(out_file.parent, overwrite=True)
    click.echo(str(write_text(out_file, page)))

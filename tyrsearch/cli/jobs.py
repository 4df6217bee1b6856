"""`tyrsearch submit` and `tyrsearch jobs`: searches run as Ray Jobs on a cluster."""

from __future__ import annotations

import json
import sys

import click

from tyrsearch.cli import options


def _jobs(address: str):
    from tyrsearch.runners.ray_jobs import Jobs

    return Jobs(address)


def _finish_job(status: dict, as_json: bool) -> None:
    """Print a finished job's status; exit 1 unless it succeeded."""
    options.emit(status, as_json)
    if status["status"] != "SUCCEEDED":
        sys.exit(1)


@click.command("submit", context_settings={"ignore_unknown_options": True})
@options.jobs_address()
@options.wait()
@options.as_json()
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit_command(address: str, wait: bool, as_json: bool, args: tuple[str, ...]) -> None:
    """Submit a tyrsearch command as a Ray Job and print its id, e.g.
    `tyrsearch submit --address http://HOST:8265 -- search --model ... --runner ray`."""
    jobs = _jobs(address)
    job_id = jobs.submit(list(args))
    if wait:
        _finish_job(jobs.wait(job_id), as_json)
    elif as_json:
        options.emit({"job_id": job_id}, as_json)
    else:
        click.echo(job_id)


@click.group("jobs")
def jobs_group() -> None:
    """Follow searches submitted with `tyrsearch submit`: status, logs, stop, list."""


@jobs_group.command("status")
@click.argument("job_id")
@options.jobs_address()
@options.wait()
@options.as_json()
def jobs_status_command(job_id: str, address: str, wait: bool, as_json: bool) -> None:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    jobs = _jobs(address)
    if wait:
        _finish_job(jobs.wait(job_id), as_json)
    else:
        options.emit(jobs.status(job_id), as_json)


@jobs_group.command("logs")
@click.argument("job_id")
@options.jobs_address()
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
@options.jobs_address()
def jobs_stop_command(job_id: str, address: str) -> None:
    """Stop the job (its search can be continued later with `search --resume`)."""
    stopped = _jobs(address).stop(job_id)
    click.echo(f"{job_id}: {'stopping' if stopped else 'had already finished'}")


@jobs_group.command("list")
@options.jobs_address()
@click.option("--json", "as_json", is_flag=True, help="print one JSON list on stdout")
def jobs_list_command(address: str, as_json: bool) -> None:
    """Every job the cluster knows, oldest first."""
    listed = _jobs(address).list()
    if as_json:
        click.echo(json.dumps(listed))
    for job in [] if as_json else listed:
        click.echo(f"{job['job_id']}  {job['status']:<9}  {job['entrypoint']}")

"""The `tyrsearch` command line: a thin face over `tyrsearch.api`. Every command that produces something
writes into --out and, with --json, prints one JSON object on stdout. User errors exit with status 2 and one
line on stderr, naming the flag."""

from __future__ import annotations

import os
import sys

import click

from tyrsearch.cli import evaluate, export, jobs, meta, moe, prune, search
from tyrsearch.cli.options import flag_of
from tyrsearch.errors import ParameterError, UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tyrsearch")
def cli() -> None:
    """tyrsearch: find how much to prune in each layer of a transformer, prune it, and ship it."""


for command in (evaluate.eval_command, prune.prune_command, search.search_command, search.worker_command,
                search.dashboard_command, search.report_command, export.export_command, export.latency_command,
                jobs.submit_command, jobs.jobs_group, moe.stun_command, meta.meta_group, moe.moefy_command,
                moe.distill_command):
    cli.add_command(command)


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
    except ParameterError as exc:
        click.echo(f"error: {exc.render(flag_of)}", err=True)
        sys.exit(2)
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

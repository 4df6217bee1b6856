"""`tyrsearch eval`."""

from __future__ import annotations

import click

from tyrsearch.cli import options


@click.command("eval")
@options.model()
@click.option("--text", default="wiki-summaries", show_default=True, help=options.TEXT_HELP)
@options.seq_len()
@click.option("--max-tokens", default=65536, show_default=True, type=click.IntRange(min=2),
              help="tokens of text to evaluate (whole sequences of --seq-len)")
@click.option("--zero-shot", "zero_shot", default=0, show_default=True, type=click.IntRange(min=0),
              help="also score N examples each of ARC-Easy, PIQA, HellaSwag, WinoGrande (0: skip)")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@options.placement()
@options.as_json()
def eval_command(model_ref: str, as_json: bool, **settings) -> None:
    """Perplexity (and optionally zero-shot accuracy) of a model on a text."""
    from tyrsearch import api

    options.emit(api.evaluate(model_ref, progress=not as_json, **settings).to_json(), as_json)

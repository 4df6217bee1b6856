"""`tyrsearch prune`."""

from __future__ import annotations

from pathlib import Path

import click

from tyrsearch.cli import options


@click.command("prune")
@options.model()
@click.option("--criterion", default="osscar", show_default=True,
              help="local criterion: osscar, flap, wanda, taylor, magnitude, random")
@click.option("--sparsity", required=True, type=float,
              help="fraction in [0, 1) of the decoder layers' prunable parameters to remove "
                   "(q/k/v/o and gate/up/down weights; embeddings and lm_head excluded)")
@click.option("--allocation", default="uniform", show_default=True,
              help="uniform, owl, or knapsack (per-layer sensitivity curves from the supernet + a dynamic program)")
@click.option("--space", default=None,
              help="knapsack only: search space name or YAML (default: the family's, e.g. llama)")
@click.option("--sensitivity-seqs", default=2, show_default=True, type=click.IntRange(min=1),
              help="knapsack only: calibration sequences on which each layer variant's KL is measured")
@click.option("--attention-sparsity", default=0.0, show_default=True, type=float,
              help="fraction of each layer's attention removed (whole heads / KV groups); MLP channels do the rest")
@options.calibration(seqs=64)
@click.option("--sequential/--no-sequential", default=True, show_default=True,
              help="calibrate each layer on the outputs of the already pruned layers before it")
@options.seed()
@options.out_dir("folder for the pruned HF model and result.json")
@options.overwrite()
@options.placement()
@click.option("--stream/--no-stream", default=None,
              help="walk the model one layer at a time on the device, its weights on the host "
                   "[default: when they do not fit on the GPU]")
@options.held_out(tokens=0)
@options.heal()
@click.option("--offload", is_flag=True, help="keep the calibration hidden states on the host too")
@options.as_json()
def prune_command(model_ref: str, out_dir: Path, as_json: bool, **settings) -> None:
    """Prune a model one-shot with a local criterion and a layer allocation; save it as an HF folder."""
    from tyrsearch import api

    options.emit(api.prune(model_ref, out=out_dir, **settings).to_json(), as_json)

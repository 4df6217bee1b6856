"""`tyrsearch export` and `tyrsearch latency`: ONNX files and what they cost in ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tyrsearch.cli import options
from tyrsearch.cli.search import LATENCY_SEQ_HELP


@click.command("export")
@options.model(f"the model to export: a folder from `tyrsearch prune` or `search` (per-layer shapes), or "
               f"{options.MODEL_HELP}")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="onnx: the .onnx file to write (its folder receives the tokenizer, config, genai_config.json and "
                   "runtime.py); gguf: the .gguf file")
@click.option("--format", default="onnx", show_default=True, type=click.Choice(["onnx", "gguf"]),
              help="onnx: ONNX Runtime and onnxruntime-genai; gguf: llama.cpp (llama architecture, or deci for "
                   "per-layer shapes)")
@click.option("--quant", default="f16", show_default=True, type=click.Choice(["f32", "f16", "q8_0", "q4_k_m"]),
              help="gguf: the weights' type (q4_k_m by llama.cpp's quantizer)")
@click.option("--kv-cache", is_flag=True, help="the decoder graph with past key/values (for generation)")
@click.option("--int8", is_flag=True, help="also write FILE.int8.onnx, verified too")
@click.option("--int8-method", default="dynamic", show_default=True,
              help="dynamic: int8 weights and activations (fast); weights: 8-bit weight-only (near lossless, slow)")
@click.option("--int8-smooth", default=0.75, show_default=True, type=float,
              help="dynamic int8: SmoothQuant strength for the MLP down projections' outliers (0: none)")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset (18 to 23)")
@click.option("--last-only", is_flag=True, help="prefill graph: logits of the last position only")
@options.as_json()
def export_command(model_ref: str, out_file: Path, as_json: bool, **settings) -> None:
    """Export a model to ONNX or GGUF and verify it against torch in its runtime (ONNX Runtime and
    onnxruntime-genai; llama.cpp): exit 1 if the verification fails, with its figures."""
    from tyrsearch import api

    exported = api.export(model_ref, out=out_file, **settings)
    options.emit(exported.to_json(), as_json)
    if exported.verified is None:
        click.echo(f"note: {out_file} is not verified: llama-cpp-python is not installed", err=True)
    elif not exported.verified:
        where = out_file.parent / "export.json" if out_file.suffix == ".onnx" else "the figures above"
        click.echo(f"error: the export of {model_ref} did not verify; see {where}", err=True)
        sys.exit(1)


@click.command("latency")
@options.model()
@options.seq_len(default=128, help=LATENCY_SEQ_HELP)
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
@options.seed("of the random per-layer plan")
@options.as_json()
def latency_command(model_ref: str, seq_len: int, threads: int, mlp_step: int, repeats: int, check_models: int,
                    rebuild: bool, out_file: Path | None, seed: int, as_json: bool) -> None:
    """Build (once per machine, then cached) the latency table of a model's blocks in ONNX Runtime, and check
    its estimates against whole exported models."""
    from tyrsearch.atomic import write_json
    from tyrsearch.errors import ParameterError
    from tyrsearch.exporters.latency import Workload, measure_model

    if out_file is not None and out_file.exists():
        raise ParameterError("out", f"{out_file} already exists: choose a new path or remove it")
    workload = Workload(seq_len=seq_len, threads=threads, repeats=repeats, mlp_step=mlp_step)
    result = measure_model(model_ref, workload, check_models=check_models, rebuild=rebuild, seed=seed)
    if out_file is not None:
        write_json(out_file, result)
    options.emit(result, as_json)

"""Mixture-of-Experts commands: `tyrsearch stun`, `moefy`, and `distill` (which heals moefied and pruned
students alike)."""

from __future__ import annotations

from pathlib import Path

import click

from tyrsearch.cli import options


@click.command("stun")
@options.model(f"a Mixture-of-Experts model (Mixtral, Qwen2-MoE, OLMoE; e.g. from `tyrsearch moefy`): "
               f"{options.MODEL_HELP}")
@options.out_dir("folder for the pruned HF model and result.json")
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
@options.calibration(seqs=32, seqs_help="calibration sequences of --seq-len tokens (one forward pass over them)")
@options.seed()
@options.held_out(tokens=0)
@options.placement()
@options.as_json()
def stun_command(model_ref: str, out_dir: Path, as_json: bool, **settings) -> None:
    """STUN for Mixture-of-Experts models: remove whole experts (chosen by how alike they behave), then prune
    the rest unstructured (zeros in dense weights) to a total sparsity; save the model as an HF folder."""
    from tyrsearch import api

    options.emit(api.stun(model_ref, out=out_dir, progress=not as_json, **settings).to_json(), as_json)


@click.command("moefy")
@options.model()
@click.option("--experts", required=True, type=int, help="experts per layer; each gets an equal share of MLP neurons")
@click.option("--top-k", "top_k", required=True, type=int, help="experts active per token")
@options.out_dir("folder for the Mixtral HF model and result.json")
@click.option("--calibration", "--calib", "calib", default="c4", show_default=True, help=options.TEXT_HELP)
@click.option("--calibration-sequences", "--calib-seqs", "calib_seqs", default=64, show_default=True,
              type=click.IntRange(min=1), help="calibration sequences of --seq-len tokens")
@options.seq_len()
@options.seed()
@click.option("--eval-text", default="wiki-summaries", show_default=True,
              help=f"held-out text for the dense and MoE perplexity: {options.TEXT_HELP}")
@click.option("--eval-tokens", default=16384, show_default=True, type=click.IntRange(min=0),
              help="tokens of --eval-text on which both perplexities are measured (0: skip)")
@options.overwrite()
@options.placement()
@options.as_json()
def moefy_command(model_ref: str, out_dir: Path, as_json: bool, **settings) -> None:
    """Split each MLP of a dense Llama-family model into experts with a fitted router (MoEfication) and
    save the result as a Mixtral model; report its held-out perplexity next to the dense model's."""
    from tyrsearch import api

    options.emit(api.moefy(model_ref, out=out_dir, **settings).to_json(), as_json)


@click.command("distill")
@click.option("--teacher", "teacher_ref", required=True,
              help=f"the dense model the student was made from: {options.MODEL_HELP}")
@click.option("--student", "student_ref", required=True, help="the moefied or pruned model folder to train")
@options.out_dir("folder for the trained student and result.json; checkpoints go to OUT.checkpoints/ meanwhile")
@click.option("--steps", default=500, show_default=True, type=click.IntRange(min=1), help="optimizer steps")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="windows per step")
@options.seq_len(default=256, help="tokens per window, in training and in the perplexities before and after")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="peak learning rate (AdamW, linear warmup, cosine decay)")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0), help="warmup steps")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="softmax temperature of both distributions (the loss is scaled by its square)")
@click.option("--train", default="mlp", show_default=True, type=click.Choice(["mlp", "all"]),
              help="mlp: only the MLP / MoE blocks (experts and routers) train; all: every weight")
@click.option("--method", default="full", show_default=True, type=click.Choice(["full", "lora"]),
              help="full: the --train weights train; lora: LoRA adapters on those projections (peft), merged into "
                   "the weights at the end (same shapes)")
@click.option("--text", default="c4", show_default=True,
              help=f"training text: {options.TEXT_HELP}; several joined by commas (c4,wiki) are all used")
@click.option("--save-every", default=50, show_default=True, type=click.IntRange(min=1),
              help="steps between checkpoints (a rerun resumes from the last)")
@options.seed()
@click.option("--eval-text", default="wiki-summaries", show_default=True,
              help=f"held-out text for the perplexities before and after: {options.TEXT_HELP}")
@click.option("--eval-tokens", default=16384, show_default=True, type=click.IntRange(min=0),
              help="tokens of --eval-text (0: skip)")
@click.option("--overwrite", is_flag=True, help="replace --out and drop OUT.checkpoints/ (start over)")
@options.placement(what="the teacher (the student trains in float32 with this dtype's autocast)")
@options.as_json()
def distill_command(teacher_ref: str, student_ref: str, out_dir: Path, as_json: bool, **settings) -> None:
    """Train a moefied or pruned student to match its dense teacher's next-token distributions (KL), on
    --text, with checkpoints: interrupted, the same command resumes where it stopped."""
    from tyrsearch import api

    options.emit(api.distill(teacher_ref, student_ref, out=out_dir, **settings).to_json(), as_json)

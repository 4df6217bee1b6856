"""Mixture-of-Experts commands: `tyrsearch stun`, `moefy`, and `distill` (which heals moefied and pruned
students alike)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from tyrsearch.api import check_out_dir
from tyrsearch.cli import options
from tyrsearch.errors import UserError


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
@options.as_json()
def stun_command(model_ref: str, out_dir: Path, experts_keep: str | None, calib: str, calib_seqs: int, seq_len: int,
                 eval_text: str, eval_tokens: int, as_json: bool, **settings) -> None:
    """STUN for Mixture-of-Experts models: remove whole experts (chosen by how alike they behave), then prune
    the rest unstructured (zeros in dense weights) to a total sparsity; save the model as an HF folder."""
    from tyrsearch import assets, data, metrics, texts
    from tyrsearch.materialize import save_pruned
    from tyrsearch.moe.stun import StunConfig, check_config, parse_keep, stun_prune

    config = StunConfig(experts_keep=parse_keep(experts_keep) if experts_keep is not None else None, **settings)
    check_out_dir(out_dir, overwrite=False)
    sources = [texts.read_text(source) for source in texts.mixture(calib)]
    held_out = {name: texts.read_text(name) for name in texts.mixture(eval_text)} if eval_tokens else {}
    model, tokenizer = assets.load_model(model_ref)
    check_config(model, config)  # every other mistake, before the calibration pass
    batches = data.mixed_batches(tokenizer, sources, seq_len=seq_len, count=calib_seqs, seed=config.seed)
    before = {"params": metrics.total_params(model), "decoder_params": metrics.decoder_params(model)}
    report = stun_prune(model, batches, config=config, progress=not as_json)
    result = {
        "model": model_ref, "out": str(out_dir),
        "achieved_sparsity": report["sparsity"]["total"], "experts_kept": report["experts"]["total_kept"],
        "params_before": before["params"], "params_after": metrics.total_params(model),
        "decoder_params_before": before["decoder_params"], "decoder_params_after": metrics.decoder_params(model),
        **report,
        "calibration": {"source": calib, "seq_len": seq_len, "seed": config.seed, **report["calibration"]},
    }
    if held_out:
        tic = time.perf_counter()
        result["held_out"] = {name: metrics.perplexity(model, data.eval_batches(tokenizer, text, seq_len=seq_len,
                                                                                 max_tokens=eval_tokens),
                                                        progress=not as_json) for name, text in held_out.items()}
        result["time_s"]["eval"] = time.perf_counter() - tic
    save_pruned(model, tokenizer, out_dir, result=result)
    options.emit(result, as_json)


@click.command("moefy")
@options.model()
@click.option("--experts", required=True, type=int, help="experts per layer; each gets an equal share of MLP neurons")
@click.option("--top-k", "top_k", required=True, type=int, help="experts active per token")
@options.out_dir("folder for the Mixtral HF model and result.json")
@click.option("--calibration", "--calib", "calib_source", default="c4", show_default=True, help=options.TEXT_HELP)
@click.option("--calibration-sequences", "--calib-seqs", "calib_seqs", default=64, show_default=True,
              type=click.IntRange(min=1), help="calibration sequences of --seq-len tokens")
@options.seq_len()
@options.seed()
@click.option("--eval-text", default="wiki-summaries", show_default=True,
              help=f"held-out text for the dense and MoE perplexity: {options.TEXT_HELP}")
@click.option("--eval-tokens", default=16384, show_default=True, type=click.IntRange(min=0),
              help="tokens of --eval-text on which both perplexities are measured (0: skip)")
@options.overwrite()
@options.as_json()
def moefy_command(model_ref: str, experts: int, top_k: int, out_dir: Path, calib_source: str, calib_seqs: int,
                  seq_len: int, seed: int, eval_text: str, eval_tokens: int, overwrite: bool, as_json: bool) -> None:
    """Split each MLP of a dense Llama-family model into experts with a fitted router (MoEfication) and
    save the result as a Mixtral model; report its held-out perplexity next to the dense model's."""
    from tyrsearch import assets, data, metrics, texts
    from tyrsearch.moe import active_params, check_counts, check_moefiable, moefy, save_moe

    # everything a user can get wrong is checked before the long work
    check_counts(experts=experts, top_k=top_k)
    check_out_dir(out_dir, overwrite=overwrite)
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
        "params": metrics.total_params(moe), "active_params": active_params(moe),
        "active_fraction": round(active_params(moe) / metrics.total_params(moe), 4),
        "dense_params": metrics.total_params(model),
        "calibration": {"source": calib_source, "sequences": calib_seqs, "seq_len": seq_len,
                        "tokens": int(batches.numel()), "seed": seed},
        "moefy_s": round(time.perf_counter() - start, 1),
    }
    if eval_batches is not None:
        start = time.perf_counter()
        dense_ppl = metrics.perplexity(model, eval_batches)["ppl"]
        moe_eval = metrics.perplexity(moe, eval_batches)
        result.update({"eval_text": eval_text, "eval_tokens": moe_eval["tokens"], "dense_ppl": dense_ppl,
                       "moe_ppl": moe_eval["ppl"], "ppl_ratio": moe_eval["ppl"] / dense_ppl,
                       "eval_s": round(time.perf_counter() - start, 1)})
    save_moe(moe, tokenizer, out_dir, result=result)
    options.emit(result, as_json)


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
@click.option("--text", "text_source", default="c4", show_default=True, help=f"training text: {options.TEXT_HELP}")
@click.option("--save-every", default=50, show_default=True, type=click.IntRange(min=1),
              help="steps between checkpoints (a rerun resumes from the last)")
@options.seed()
@click.option("--eval-text", default="wiki-summaries", show_default=True,
              help=f"held-out text for the perplexities before and after: {options.TEXT_HELP}")
@click.option("--eval-tokens", default=16384, show_default=True, type=click.IntRange(min=0),
              help="tokens of --eval-text (0: skip)")
@click.option("--overwrite", is_flag=True, help="replace --out and drop OUT.checkpoints/ (start over)")
@options.as_json()
def distill_command(teacher_ref: str, student_ref: str, out_dir: Path, steps: int, batch_size: int, seq_len: int,
                    lr: float, warmup: int, temperature: float, train: str, text_source: str, save_every: int,
                    seed: int, eval_text: str, eval_tokens: int, overwrite: bool, as_json: bool) -> None:
    """Train a moefied or pruned student to match its dense teacher's next-token distributions (KL), on
    --text, with checkpoints: interrupted, the same command resumes where it stopped."""
    import contextlib
    import shutil

    from tyrsearch import assets, data, metrics, texts
    from tyrsearch.distill import DistillConfig, check_pair, check_resumable, distill, save_student

    check_out_dir(out_dir, overwrite=overwrite)
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
    eval_batches = data.eval_batches(tokenizer, held_out, seq_len=seq_len, max_tokens=eval_tokens) if held_out else None
    result = {"teacher": teacher_ref, "student": str(student_dir), "out": str(out_dir), "steps": steps,
              "train_tokens": steps * batch_size * seq_len, "text": text_source, "text_windows": windows.shape[0]}
    if eval_batches is not None:
        result.update(eval_text=eval_text, teacher_ppl=metrics.perplexity(teacher, eval_batches)["ppl"],
                      student_ppl_before=metrics.perplexity(student, eval_batches)["ppl"])
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs; stdout carries only the result
        history = distill(teacher, student, windows, checkpoints, config=config, settings=settings)
    result["train_s"] = round(time.perf_counter() - start, 1)  # this run's share, when resumed
    result["loss"] = [{"step": row["step"], "loss": row["loss"]} for row in history if "loss" in row]
    if eval_batches is not None:
        after = metrics.perplexity(student, eval_batches)["ppl"]
        result.update(student_ppl=after, ppl_ratio_before=result["student_ppl_before"] / result["teacher_ppl"],
                      ppl_ratio=after / result["teacher_ppl"])
    save_student(student, student_dir, out_dir, result=result)
    shutil.rmtree(checkpoints)
    options.emit(result, as_json)

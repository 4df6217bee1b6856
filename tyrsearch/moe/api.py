"""The Mixture-of-Experts part of the Python API (re-exported by `tyrsearch.api` and `tyrsearch`): `stun`,
`moefy` and `distill`, which heals moefied and pruned students alike.

    moe = tyrsearch.moefy("smollm2-135m", experts=8, top_k=2, out="runs/moe")
    healed = tyrsearch.distill("smollm2-135m", moe.out, out="runs/moe-kd", steps=500)
    tyrsearch.stun(healed.out, experts_keep=0.75, sparsity=0.5, out="runs/moe-kd-stun").achieved_sparsity

Like the rest of the API, each checks its parameters before the long work (a `ParameterError` naming the
parameter) and returns a result whose `to_json()` is what the CLI prints and writes to result.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from tyrsearch.api import _check_at_least, check_out_dir, load, reference
from tyrsearch.errors import ParameterError
from tyrsearch.placement import placement, placement_of
from tyrsearch.results import DistillResult, MoefyResult, PruneResult
from tyrsearch.texts import DEFAULT_CALIB, HELD_OUT_DOMAINS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tyrsearch.api import ModelRef


def stun(model: ModelRef, *, out: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
         experts_keep: float | int | str | None = None, sparsity: float | None = None, method: str = "stun",
         unstructured: str = "wanda", semi_structured: bool = False, router_weight: float = 0.0, merge: bool = False,
         calib: str = DEFAULT_CALIB, calib_seqs: int = 32, seq_len: int = 512, seed: int = 0,
         eval_text: str = ",".join(HELD_OUT_DOMAINS), eval_tokens: int = 0, device: str = "auto", dtype: str = "auto",
         progress: bool = True) -> PruneResult:
    """STUN for a Mixture-of-Experts model (Mixtral, Qwen2-MoE, OLMoE): remove whole experts, `experts_keep`
    of them kept in all (a share such as 0.75 or a count such as 24; chosen by `method`: stun, frequency,
    random, none), then zero weights inside what is kept (`unstructured`: wanda, owl, none) to a total
    `sparsity`, or 2:4 with `semi_structured`. One calibration pass; saved to `out` (a loaded `model` is
    pruned in place); with `eval_tokens`, the perplexity on each of `eval_text` too."""
    from tyrsearch import data, metrics, texts
    from tyrsearch.materialize import save_pruned
    from tyrsearch.moe.stun import StunConfig, check_config, check_settings, parse_keep, stun_prune

    # everything a user can get wrong is checked before the model is loaded, the rest before the calibration
    config = StunConfig(experts_keep=parse_keep(experts_keep) if isinstance(experts_keep, str) else experts_keep,
                        sparsity=sparsity, method=method, unstructured=unstructured, semi_structured=semi_structured,
                        router_weight=router_weight, merge=merge, seed=seed)
    check_settings(config)
    placement(device, dtype)
    _check_at_least(calib_seqs=(calib_seqs, 1), seq_len=(seq_len, 2), eval_tokens=(eval_tokens, 0))
    check_out_dir(Path(out), overwrite=False)
    sources = [texts.read_text(source) for source in texts.mixture(calib)]
    held_out = {name: texts.read_text(name) for name in texts.mixture(eval_text)} if eval_tokens else {}
    loaded = load(model, tokenizer, device=device, dtype=dtype)
    check_config(loaded.model, config)

    batches = data.mixed_batches(loaded.tokenizer, sources, seq_len=seq_len, count=calib_seqs, seed=seed)
    before = {"params": metrics.total_params(loaded.model), "decoder_params": metrics.decoder_params(loaded.model)}
    report = stun_prune(loaded.model, batches, config=config, progress=progress)
    figures = {
        "model": loaded.ref, "out": str(out),
        "achieved_sparsity": report["sparsity"]["total"], "experts_kept": report["experts"]["total_kept"],
        "params_before": before["params"], "params_after": metrics.total_params(loaded.model),
        "decoder_params_before": before["decoder_params"],
        "decoder_params_after": metrics.decoder_params(loaded.model),
        **report,
        "calibration": {"source": calib, "seq_len": seq_len, "seed": seed, **report["calibration"]},
        "placement": placement_of(loaded.model).to_json(),
    }
    if held_out:
        tic = time.perf_counter()
        figures["held_out"] = metrics.held_out(loaded.model, loaded.tokenizer, held_out, seq_len=seq_len,
                                               max_tokens=eval_tokens, progress=progress)
        figures["time_s"]["eval"] = time.perf_counter() - tic
    save_pruned(loaded.model, loaded.tokenizer, out, result=figures)
    return PruneResult(figures=figures, out=Path(out), model=loaded.model, tokenizer=loaded.tokenizer)


def moefy(model: ModelRef, *, experts: int, top_k: int, out: str | Path,
          tokenizer: PreTrainedTokenizerBase | None = None, calib: str = "c4", calib_seqs: int = 64,
          seq_len: int = 512, seed: int = 0, eval_text: str = "wiki-summaries", eval_tokens: int = 16384,
          overwrite: bool = False, device: str = "auto", dtype: str = "auto", progress: bool = True) -> MoefyResult:
    """Split each MLP of a dense Llama-family model into `experts` experts, `top_k` active per token, with a
    fitted router (MoEfication); saved as a Mixtral model to `out` (the dense `model` is left unchanged). With
    `eval_tokens`, the held-out perplexity of both on `eval_text`."""
    from tyrsearch import data, metrics, texts
    from tyrsearch.moe.moefy import active_params, check_counts, check_moefiable, save_moe
    from tyrsearch.moe.moefy import moefy as moefied

    # everything a user can get wrong is checked before the long work
    check_counts(experts=experts, top_k=top_k)
    placement(device, dtype)
    _check_at_least(calib_seqs=(calib_seqs, 1), seq_len=(seq_len, 2), eval_tokens=(eval_tokens, 0))
    check_out_dir(Path(out), overwrite=overwrite)
    calibration = texts.read_text(calib)
    held_out = texts.read_text(eval_text) if eval_tokens else None
    loaded = load(model, tokenizer, device=device, dtype=dtype)
    check_moefiable(loaded.model.config, experts=experts, top_k=top_k)
    batches = data.calibration_batches(loaded.tokenizer, calibration, seq_len=seq_len, count=calib_seqs, seed=seed)
    eval_batches = None
    if held_out is not None:
        eval_batches = data.eval_batches(loaded.tokenizer, held_out, seq_len=seq_len, max_tokens=eval_tokens)

    start = time.perf_counter()
    moe = moefied(loaded.model, batches, experts=experts, top_k=top_k, seed=seed, progress=progress)
    figures = {
        "model": loaded.ref, "out": str(out), "experts": experts, "top_k": top_k,
        "params": metrics.total_params(moe), "active_params": active_params(moe),
        "active_fraction": round(active_params(moe) / metrics.total_params(moe), 4),
        "dense_params": metrics.total_params(loaded.model),
        "calibration": {"source": calib, "sequences": calib_seqs, "seq_len": seq_len,
                        "tokens": int(batches.numel()), "seed": seed},
        "placement": placement_of(moe).to_json(),
        "moefy_s": round(time.perf_counter() - start, 1),
    }
    if eval_batches is not None:
        start = time.perf_counter()
        dense_ppl = metrics.perplexity(loaded.model, eval_batches, progress=progress)["ppl"]
        moe_eval = metrics.perplexity(moe, eval_batches, progress=progress)
        figures.update({"eval_text": eval_text, "eval_tokens": moe_eval["tokens"], "dense_ppl": dense_ppl,
                        "moe_ppl": moe_eval["ppl"], "ppl_ratio": moe_eval["ppl"] / dense_ppl,
                        "eval_s": round(time.perf_counter() - start, 1)})
    save_moe(moe, loaded.tokenizer, out, result=figures)
    return MoefyResult(figures=figures, out=Path(out), model=moe, tokenizer=loaded.tokenizer)


def distill(teacher: ModelRef, student: str | Path, *, out: str | Path,
            tokenizer: PreTrainedTokenizerBase | None = None, steps: int = 500, batch_size: int = 4,
            seq_len: int = 256, lr: float = 1e-3, warmup: int = 20, temperature: float = 1.0, train: str = "mlp",
            method: str = "full", text: str = "c4", save_every: int = 50, seed: int = 0,
            eval_text: str = "wiki-summaries",
            eval_tokens: int = 16384, overwrite: bool = False, device: str = "auto", dtype: str = "auto",
            progress: bool = True) -> DistillResult:
    """Train a moefied or pruned `student` (a model folder) to match its dense `teacher`'s next-token
    distributions (KL) on windows of `text` (several joined by commas: all of each): only its MLP / MoE
    blocks with `train="mlp"`, every weight with "all"; `method="lora"` trains LoRA adapters on those
    projections instead (peft) and merges them into the weights, the shapes unchanged. Checkpoints go to
    OUT.checkpoints/ every `save_every` steps; interrupted, the same call resumes where it stopped
    (`overwrite=True` starts over). With `eval_tokens`, the held-out perplexities of teacher and student
    before and after, on `eval_text`. Trainer prints its logs on stderr."""
    import shutil

    import torch
    from transformers import AutoConfig

    from tyrsearch import assets, data, healing, metrics, texts

    # everything a user can get wrong is checked before the long work
    where = placement(device, dtype)
    _check_at_least(steps=(steps, 1), batch_size=(batch_size, 1), seq_len=(seq_len, 2), warmup=(warmup, 0),
                    save_every=(save_every, 1), eval_tokens=(eval_tokens, 0))
    _check_positive(lr=lr, temperature=temperature)
    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    checkpoints = out.with_name(out.name + ".checkpoints")
    config = healing.DistillConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                                   temperature=temperature, train=train, save_every=save_every, seed=seed,
                                   method=method)
    student_dir = assets.resolve_model(str(student))
    settings = {"teacher": reference(teacher), "student": str(student_dir), "text": text, "seq_len": seq_len}
    if not overwrite:
        healing.check_resumable(checkpoints, config, settings)  # before the long work, not after the first evaluations
    train_texts = {name: texts.read_text(name) for name in texts.mixture(text)}
    held_out = texts.read_text(eval_text) if eval_tokens else None
    loaded = load(teacher, tokenizer, device=device, dtype=dtype)
    saved_dtype = AutoConfig.from_pretrained(student_dir).dtype or torch.float32  # the student is saved so again
    student_model, _ = assets.load_model(str(student_dir))  # float32 master weights, trained with autocast
    healing.check_pair(loaded.model, student_model)
    healing.check_trainable(student_model, train, method)
    windows = healing.text_windows(loaded.tokenizer, train_texts, seq_len=seq_len, batch_size=batch_size)
    if overwrite and checkpoints.exists():  # only once the input is known to be good
        shutil.rmtree(checkpoints)
    eval_batches = None if held_out is None else data.eval_batches(loaded.tokenizer, held_out, seq_len=seq_len,
                                                                   max_tokens=eval_tokens)

    figures = {"teacher": settings["teacher"], "student": str(student_dir), "out": str(out), "steps": steps,
               "method": method, "train": train, "lr": lr, "train_tokens": steps * batch_size * seq_len, "text": text,
               "text_windows": windows.shape[0], "epochs": round(steps * batch_size / windows.shape[0], 3)}
    if eval_batches is not None:
        figures.update(eval_text=eval_text,
                       teacher_ppl=metrics.perplexity(loaded.model, eval_batches, progress=progress)["ppl"],
                       student_ppl_before=metrics.perplexity(student_model, eval_batches, progress=progress)["ppl"])
    start = time.perf_counter()
    history = healing.distill(loaded.model, student_model, windows, checkpoints, config=config,
                              settings=settings, progress=progress, device=where.device, autocast=where.dtype)
    figures["train_s"] = round(time.perf_counter() - start, 1)  # this run's share, when resumed
    figures["loss"] = [{"step": row["step"], "loss": row["loss"], "tokens_per_s": row["tokens_per_s"]}
                       for row in history if "loss" in row]
    if eval_batches is not None:
        after = metrics.perplexity(student_model, eval_batches, progress=progress)["ppl"]
        figures.update(student_ppl=after, ppl_ratio_before=figures["student_ppl_before"] / figures["teacher_ppl"],
                       ppl_ratio=after / figures["teacher_ppl"])
    healing.save_student(student_model.to(saved_dtype), student_dir, out, result=figures)
    shutil.rmtree(checkpoints)
    return DistillResult(figures=figures, out=out, model=student_model, tokenizer=loaded.tokenizer)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ParameterError(name, f"must be a number > 0, got {value!r}")


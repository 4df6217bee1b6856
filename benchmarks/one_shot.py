"""One-shot structural pruning of the real reference models: every criterion x allocation x sparsity.

For each row: held-out perplexity (wiki-summaries, seq 512), parameters, pruning time, and the prefill
speedup over the dense model measured side by side in this run (alternating timed forwards of the
same tokens, median of several). Rows are written as they finish; rerunning skips finished rows, so
an interrupted run resumes.

    .venv/bin/python benchmarks/one_shot.py                # the full grid (hours on 2 cores)
    .venv/bin/python benchmarks/one_shot.py --sparsities 0.3 --criteria osscar flap
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from report import environment, load, save

from tyrsearch import assets, data, metrics, texts
from tyrsearch.local import CRITERIA, make_criterion
from tyrsearch.models import adapter_for
from tyrsearch.pruner import OneShotConfig, one_shot
from tyrsearch.search.knapsack import knapsack_prune
from tyrsearch.space import load_space

NAME = "one_shot"


@torch.inference_mode()
def prefill_speedup(dense, pruned, tokens: torch.Tensor, *, repeats: int = 5) -> float:
    """Dense / pruned wall time of one prefill (logits of the last position), interleaved runs."""
    times = {"dense": [], "pruned": []}
    for model in (dense, pruned):  # warm-up
        model(tokens, use_cache=False, logits_to_keep=1)
    for _ in range(repeats):
        for key, model in (("dense", dense), ("pruned", pruned)):
            start = time.perf_counter()
            model(tokens, use_cache=False, logits_to_keep=1)
            times[key].append(time.perf_counter() - start)
    return statistics.median(times["dense"]) / statistics.median(times["pruned"])


def remeasure_speed(results: dict, *, repeats: int) -> None:
    """Re-time every row's prefill speedup in one quiet pass. Speed depends only on the per-layer shapes,
    so each row's shapes are rebuilt (random weights) and timed against the dense model side by side."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tyrsearch.materialize import to_pruned

    for model_ref in {r["model"] for r in results["rows"]}:
        dense, tokenizer = assets.load_model(model_ref)
        tokens = data.eval_batches(tokenizer, texts.read_text("wiki-summaries"), seq_len=512, max_tokens=1024)
        template = to_pruned(dense).config.to_dict()
        for row in (r for r in results["rows"] if r["model"] == model_ref):
            config = AutoConfig.for_model(**{**template, "block_configs": row["layers"]})
            pruned = AutoModelForCausalLM.from_config(config).eval()
            row["prefill_speedup"] = prefill_speedup(dense, pruned, tokens, repeats=repeats)
            print(f"{model_ref} {row['criterion']} {row['allocation']} {row['sparsity']}: "
                  f"speedup {row['prefill_speedup']:.2f}", flush=True)
        results["speed_remeasured"] = {"repeats": repeats, "environment": environment()}
        save(NAME, results, table(results))


def table(results: dict) -> str:
    lines = [
        "| model | criterion | allocation | sparsity | decoder params | ppl | ppl / dense | prefill speedup "
        "| prune s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, dense in results.get("dense", {}).items():
        lines.append(f"| {model} | dense | - | 0 | {dense['decoder_params'] / 1e6:.1f}M | {dense['ppl']:.2f} | 1.00 "
                     "| 1.00 | - |")
    rows = sorted(results.get("rows", []), key=lambda r: (r["model"], r["sparsity"], r["ppl"]))
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['criterion']} | {r['allocation']} | {r['sparsity']} | "
            f"{r['decoder_params'] / 1e6:.1f}M | {r['ppl']:.2f} | {r['ppl_ratio']:.2f} | "
            f"{r['prefill_speedup']:.2f} | {r['prune_s']:.0f} |"
        )
    settings = results.get("settings", {})
    lines.append("")
    lines.append(
        f"Held-out `wiki-summaries` ppl at seq {settings.get('seq_len')}, {settings.get('eval_tokens')} tokens "
        f"({settings.get('gemma_eval_tokens')} for Gemma-3); calibration `c4`, {settings.get('calib_seqs')} x "
        f"{settings.get('seq_len')} tokens, sequential; uniform and owl keep attention dense (MLP channels carry "
        "the sparsity); knapsack picks per-layer levels of query heads and MLP channels from per-variant KL "
        "(2 x 512 calibration tokens) around the uniform centre (search_spaces/llama.yaml grid). "
        "Prefill speedup: dense / pruned torch forward time on 2 x 512 tokens (last-position logits), "
        "interleaved runs in one process, median"
        + (f" of {results['speed_remeasured']['repeats']}, re-timed in one quiet pass from each row's shapes"
           if "speed_remeasured" in results else "")
        + "."
    )
    return "\n".join(lines) + "\n"


def run(args) -> None:
    results = load(NAME)
    settings = {"seq_len": args.seq_len, "eval_tokens": args.eval_tokens, "gemma_eval_tokens": args.gemma_eval_tokens,
                "calib_seqs": args.calib_seqs}
    if results.get("settings") not in (None, settings):
        results = {}  # different settings: start over rather than mix figures
    results.update(settings=settings, environment=environment())
    results.setdefault("rows", [])
    results.setdefault("dense", {})
    heldout = texts.read_text("wiki-summaries")
    calib_text = texts.read_text("c4")
    calib_tokens = {}  # model -> c4 token ids, tokenized once
    # The knapsack allocation is the search's start, so it is run with the search's local pruner only,
    # after the uniform / owl baselines.
    grid = [("smollm2-135m", s, a, c, args.eval_tokens) for s in args.sparsities for a in args.allocations
            for c in args.criteria if a != "knapsack" or c == "osscar"]
    grid.sort(key=lambda row: row[2] == "knapsack")
    if args.gemma:
        grid.append(("gemma3-270m", 0.3, "uniform", "osscar", args.gemma_eval_tokens))
    done = {(r["model"], r["sparsity"], r["allocation"], r["criterion"]) for r in results["rows"]}
    loaded = {}
    for model_ref, sparsity, allocation, criterion, eval_tokens in grid:
        if (model_ref, sparsity, allocation, criterion) in done:
            continue
        if model_ref not in loaded:
            dense, tokenizer = assets.load_model(model_ref)
            calib_tokens[model_ref] = data.tokenize(tokenizer, calib_text)
            loaded = {model_ref: (dense, tokenizer,
                                  data.eval_batches(tokenizer, heldout, seq_len=args.seq_len, max_tokens=eval_tokens),
                                  data.calibration_batches(tokenizer, calib_tokens[model_ref], seq_len=args.seq_len,
                                                           count=args.calib_seqs, seed=0))}
            if model_ref not in results["dense"]:
                ppl = metrics.perplexity(dense, loaded[model_ref][2])
                results["dense"][model_ref] = {"ppl": ppl["ppl"], "tokens": ppl["tokens"],
                                               "decoder_params": metrics.decoder_params(dense)}
                save(NAME, results, table(results))
        dense, tokenizer, eval_ids, calib_ids = loaded[model_ref]
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        if allocation == "knapsack":
            sensitivity_ids = data.calibration_batches(tokenizer, calib_tokens[model_ref], seq_len=args.seq_len,
                                                       count=2, seed=1)
            report = knapsack_prune(model, make_criterion(criterion), calib_ids, sparsity=sparsity,
                                    space=load_space(adapter_for(model).search_space),
                                    sensitivity_batches=sensitivity_ids)
        else:
            report = one_shot(model, OneShotConfig(criterion=criterion, sparsity=sparsity, allocation=allocation),
                              calib_ids)
        prune_s = time.perf_counter() - start
        ppl = metrics.perplexity(model, eval_ids)
        dense_ppl = results["dense"][model_ref]["ppl"]
        row = {
            "model": model_ref, "criterion": criterion, "allocation": allocation, "sparsity": sparsity,
            "achieved_sparsity": report["achieved_sparsity"], "decoder_params": metrics.decoder_params(model),
            "ppl": ppl["ppl"], "ppl_ratio": ppl["ppl"] / dense_ppl, "tokens": ppl["tokens"],
            "prefill_speedup": prefill_speedup(dense, model, eval_ids[:2]), "prune_s": prune_s,
            "calib_tokens": int(calib_ids.numel()), "layers": report["layers"],
        }
        results["rows"].append(row)
        save(NAME, results, table(results))
        print(f"{model_ref} {criterion} {allocation} {sparsity}: ppl {row['ppl']:.2f} "
              f"({row['ppl_ratio']:.2f}x dense), speedup {row['prefill_speedup']:.2f}", flush=True)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.2])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "owl", "knapsack"])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--gemma-eval-tokens", type=int, default=16384)
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--gemma", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--remeasure-speed", type=int, metavar="REPEATS", default=0,
                        help="only re-time the prefill speedup of every finished row (from its shapes)")
    args = parser.parse_args()
    if args.remeasure_speed:
        remeasure_speed(load(NAME), repeats=args.remeasure_speed)
    else:
        run(args)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

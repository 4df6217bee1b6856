"""Numerics of pruning in bfloat16, and of OSSCAR's solves, on SmolLM2-135M (the README's "Devices and
precision" quotes it).

1. One-shot osscar, uniform 30%, on the same `c4` calibration tokens in float32 and in bfloat16: the share
   of the MLP channels float32 keeps that bfloat16 keeps too, held-out perplexity of both, prune times.
2. `Osscar.select_many` on real MLP groups (layers 0, 10, 20, 29; keeping 1075 and 768 of 1536 channels)
   with float64 and with float32 solves: kept-channel agreement, relative output error of the refit
   consumer through H = XᵀX (||(W - W_K) x||² / ||W x||² over the calibration tokens), time.

    .venv/bin/python benchmarks/precision.py            # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch
from report import environment, save

from tyrsearch import assets, data, metrics, texts
from tyrsearch.calibration import LayerInputs
from tyrsearch.local.osscar import Osscar
from tyrsearch.models import MLP, adapter_for
from tyrsearch.pruner import OneShotConfig, one_shot

NAME = "precision"
MODEL = "smollm2-135m"


def kept_channels(dense, pruned) -> list[set[int]]:
    """Per layer, the dense MLP channels the pruned model kept: osscar refits down_proj only, so each kept
    gate_proj row is one of the dense rows (compared in the pruned model's dtype)."""
    out = []
    for before, after in zip(dense.model.layers, pruned.model.layers, strict=True):
        kept = after.mlp.gate_proj.weight  # [K, H]
        rows = before.mlp.gate_proj.weight.to(kept.dtype)  # [I, H]
        out.append(set((kept[:, None, :] == rows[None]).all(-1).float().argmax(1).tolist()))
    return out


def bf16_against_fp32(dense, tokenizer, calib_seqs: int) -> dict:
    calib = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=512, count=calib_seqs, seed=0)
    held_out = data.eval_batches(tokenizer, texts.read_text("wiki-summaries"), seq_len=512, max_tokens=8192)
    row = {"calibration": [calib_seqs, 512]}
    kept = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = copy.deepcopy(dense).to(dtype)
        tic = time.perf_counter()
        one_shot(model, OneShotConfig(criterion="osscar", sparsity=0.3), calib, progress=False)
        row[f"{name}_prune_s"] = time.perf_counter() - tic
        row[f"{name}_ppl"] = metrics.perplexity(model, held_out, progress=False)["ppl"]
        kept[name] = kept_channels(dense, model)
    pairs = list(zip(kept["float32"], kept["bfloat16"], strict=True))
    row["agreement"] = sum(len(a & b) for a, b in pairs) / sum(len(a) for a, _ in pairs)
    row["ppl_ratio"] = row["bfloat16_ppl"] / row["float32_ppl"]
    return row


def output_error(weight: torch.Tensor, h: torch.Tensor, selection) -> float:
    """||(W - W_K) x||² / ||W x||² summed over the calibration tokens, through H = sum x xᵀ."""
    diff = weight.clone()  # [out, I]: the removed columns stay whole, the kept ones minus their refit
    diff[:, selection.kept] -= selection.consumer.double()
    return float(torch.einsum("oi,ij,oj->", diff, h, diff) / torch.einsum("oi,ij,oj->", weight, h, weight))


def solve_dtypes(dense, tokenizer, layers: tuple[int, ...], keeps: list[int]) -> list[dict]:
    adapter = adapter_for(dense)
    calib = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=256, count=8, seed=0)
    inputs = LayerInputs(dense, adapter, calib)
    rows = []
    for idx, layer in enumerate(adapter.layers(dense)):
        if idx > max(layers):
            break
        stats = inputs.collect({"mlp": layer.mlp.down_proj})["mlp"]
        if idx in layers:
            group = replace(adapter.group(layer.state_dict(), adapter.shape(layer), MLP,
                                          head_dim=adapter.head_dim(dense)),
                            xtx=stats.xtx, x_sum=stats.x_sum, tokens=stats.tokens)
            weight, h = group.consumer.reshape(group.consumer.shape[0], -1).double(), stats.xtx  # [out, I], [I, I]
            chosen, row = {}, {"layer": idx}
            for dtype in (torch.float64, torch.float32):
                criterion = Osscar()
                criterion.solve_dtype = dtype
                tic = time.perf_counter()
                chosen[dtype] = criterion.select_many(group, keeps)
                row[f"{dtype}_s".removeprefix("torch.")] = time.perf_counter() - tic

            for keep in keeps:
                a, b = chosen[torch.float64][keep], chosen[torch.float32][keep]
                row[str(keep)] = {"agreement": len(set(a.kept.tolist()) & set(b.kept.tolist())) / keep,
                                  "error_float64": output_error(weight, h, a),
                                  "error_float32": output_error(weight, h, b)}
            rows.append(row)
            print(row, flush=True)
        inputs.advance(recompute=False)
    return rows


def table(results: dict) -> str:
    b = results["bf16_against_fp32"]
    lines = [f"bf16 vs fp32 prune (osscar uniform 0.3, {b['calibration'][0]} x 512 c4 tokens): {b['agreement']:.1%} "
             f"of fp32's MLP channels kept by bf16 too; held-out ppl {b['float32_ppl']:.2f} fp32, "
             f"{b['bfloat16_ppl']:.2f} bf16 ({b['ppl_ratio']:.3f}x); prune {b['float32_prune_s']:.0f} s fp32, "
             f"{b['bfloat16_prune_s']:.0f} s bf16.", "",
             "| layer | keep | agreement f64/f32 | output error f64 | output error f32 | solve s f64 / f32 |",
             "|---|---|---|---|---|---|"]
    for row in results["solve_dtypes"]:
        for keep in (k for k in row if k.isdigit()):
            r = row[keep]
            lines.append(f"| {row['layer']} | {keep} | {r['agreement']:.3f} | {r['error_float64']:.6f} | "
                         f"{r['error_float32']:.6f} | {row['float64_s']:.1f} / {row['float32_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-seqs", type=int, default=16, help="sequences of 512 tokens for the bf16/fp32 prune")
    args = parser.parse_args()
    dense, tokenizer = assets.load_model(MODEL)
    results = {"environment": environment(),
               "solve_dtypes": solve_dtypes(dense, tokenizer, (0, 10, 20, 29), [1075, 768]),
               "bf16_against_fp32": bf16_against_fp32(dense, tokenizer, args.calib_seqs)}
    save(NAME, results, table(results))


if __name__ == "__main__":
    main()

"""How close a moefied SmolLM2 stays to the dense model, by expert count and experts active per token.

`tyrsearch moefy --model smollm2-135m --experts E --top-k k` for each (E, k) in CONFIGS (calibration c4,
64 x 512 tokens): held-out wiki-summaries ppl on 16384 tokens next to the dense model's, the share of
parameters a token runs through, and the wall time. (8, 2) is the STUN benchmark's MoE: its row is taken
from results/stun.json when that holds it (same code, same settings). The issue's goal: within 1.3x the
dense ppl.

Then: is the router or the split into experts the limit? On the dense model's own MLP inputs (c4, 32 x 512
tokens; the router fitted on the first 80%, figures on the last 20%), per layer at 8 experts / top-2: the
relative error ||y_k - y|| / ||y|| of the MLP output y when a token runs only its top-2 experts (weight 1,
no refit), chosen by moefy's fitted router, and by an oracle that knows every expert's contribution norm;
and the router's recall of the oracle's experts.

    .venv/bin/python benchmarks/moefy.py     # resumable; about 15 minutes per configuration on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from report import ROOT, environment, load, save
from tqdm.auto import tqdm

from tyrsearch import assets
from tyrsearch.calibration import LayerInputs
from tyrsearch.data import calibration_batches
from tyrsearch.models import adapter_for
from tyrsearch.moe.moefy import MoefyConfig, expert_order, expert_scores, fit_router, gated_activations, mlp_io

NAME = "moefy"
RUNS = ROOT / "runs" / "bench-moefy"
CONFIGS = ((8, 2), (16, 4), (8, 4), (8, 6))  # 25% active at two granularities, then 50% and 75%
GOAL = 1.3


def moefied(experts: int, top_k: int) -> dict:
    if (experts, top_k) == (8, 2) and (row := load("stun").get("rows", {}).get("moe")):
        return {**row["moefy"], "seconds": row["seconds"], "from": "results/stun.json"}
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tyrsearch.cli", "moefy", "--model", "smollm2-135m", "--experts",
                           str(experts), "--top-k", str(top_k), "--out", str(RUNS / f"e{experts}-k{top_k}"),
                           "--overwrite", "--json"], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"moefy {experts} / {top_k} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout), "seconds": time.perf_counter() - tic}


def output_error(acts: torch.Tensor, down: torch.Tensor, y: torch.Tensor, chosen: torch.Tensor, experts: int) -> float:
    """||y_k - y|| / ||y|| where y_k [t, H] is what the experts chosen [t, k] (weight 1) output, from
    expert-ordered activations acts [t, I] and down projection [H, I]."""
    mask = torch.zeros(chosen.shape[0], experts).scatter_(1, chosen, 1.0)  # [t, E]
    kept = (acts * mask.repeat_interleave(acts.shape[1] // experts, dim=1)) @ down.T  # [t, H]
    return float((kept - y).norm() / y.norm())


@torch.no_grad()
def routing_check(experts: int = 8, top_k: int = 2) -> dict:
    """Per layer: MLP output error with the fitted router's and the oracle's top-k, router recall."""
    model, tokenizer = assets.load_model("smollm2-135m")
    adapter = adapter_for(model)
    walker = LayerInputs(model, adapter, calibration_batches(tokenizer, assets.read_text("c4"), seq_len=512, count=32,
                                                             seed=0))
    options, layers = MoefyConfig(), []
    for index, layer in enumerate(tqdm(adapter.layers(model), desc="routing check", unit="layer")):
        x, y = mlp_io(walker, layer.mlp)  # [T, H] each
        walker.advance(recompute=False)
        acts = gated_activations(layer.mlp, x)
        order = expert_order(acts, experts=experts, options=options, seed=index)
        acts, down = acts[:, order], layer.mlp.down_proj.weight[:, order]
        scores = expert_scores(acts, down, experts)  # [T, E]
        cut = int(0.8 * x.shape[0])
        router = fit_router(x[:cut], scores[:cut], ridges=options.ridges, held_out=options.held_out)
        routed, oracle = (x[cut:] @ router.T).topk(top_k, dim=1).indices, scores[cut:].topk(top_k, dim=1).indices
        recall = float((routed[:, :, None] == oracle[:, None, :]).any(dim=2).float().mean())
        layers.append({"router_error": output_error(acts[cut:], down, y[cut:], routed, experts),
                       "oracle_error": output_error(acts[cut:], down, y[cut:], oracle, experts),
                       "recall": recall})
    return {"experts": experts, "top_k": top_k, "layers": layers}


def markdown(rows: dict, routing: dict) -> str:
    lines = ["| experts | top-k | neurons active | active params | held-out ppl | ratio to dense | wall s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['experts']} | {row['top_k']} | {row['top_k'] / row['experts']:.0%} | "
                     f"{row['active_fraction']:.1%} | {row['moe_ppl']:.2f} | {row['ppl_ratio']:.2f}x | "
                     f"{row['seconds']:.0f} |")
    dense = next(iter(rows.values()))["dense_ppl"]
    met = [f"{r['experts']}/{r['top_k']}" for r in rows.values() if r["ppl_ratio"] <= GOAL]
    layers = routing["layers"]

    def mean(key: str) -> float:
        return sum(layer[key] for layer in layers) / len(layers)

    worst = max(range(len(layers)), key=lambda i: layers[i]["oracle_error"])
    return "\n".join(lines) + (
        f"\n\nDense SmolLM2: held-out ppl {dense:.2f} (wiki-summaries, 16384 tokens at seq 512). Within "
        f"{GOAL}x of it: {', '.join(met) or 'none'}. Routing check at {routing['experts']} experts / top-"
        f"{routing['top_k']}, MLP output error without refit, mean over the {len(layers)} layers: fitted router "
        f"{mean('router_error'):.3f}, oracle {mean('oracle_error'):.3f} (worst layer {worst}: "
        f"{layers[worst]['router_error']:.3f} / {layers[worst]['oracle_error']:.3f}); router recall of the "
        f"oracle's experts {mean('recall'):.2f}.\n")


def main() -> None:
    data = load(NAME) or {}
    rows = data.setdefault("rows", {})
    for experts, top_k in CONFIGS:
        key = f"{experts}/{top_k}"
        if key not in rows:
            rows[key] = moefied(experts, top_k)
            print(json.dumps({key: rows[key]["ppl_ratio"]}), flush=True)
            save(NAME, data, "")
    if "routing" not in data:
        data["routing"] = routing_check()
    data["environment"] = environment()
    save(NAME, data, markdown(rows, data["routing"]))


if __name__ == "__main__":
    main()

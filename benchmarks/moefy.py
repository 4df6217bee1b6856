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

Then training: `tyrsearch distill` of the (8, 2) MoE towards the dense model (KL on c4 windows of 256
tokens, 4 per step, only the experts and routers train) for DISTILL_STEPS steps; held-out ppl before
and after. Resumable: a rerun continues from the last checkpoint.

Last, bounds that no router can beat without changing the weights: held-out ppl of the dense model when
each MLP keeps, per token, only (a) its neurons with the largest contributions |a_j| ||W_down[:, j]||
(the neuron oracle: any split into experts is coarser), or (b) the experts of moefy's split (clustered on
the dense model's activations, c4 32 x 512 tokens) with the largest contribution norms, at weight 1 and
without moefy's refit (the expert oracle), at several granularities.

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

from tyrsearch import assets, metrics, texts
from tyrsearch.calibration import LayerInputs
from tyrsearch.data import calibration_batches, eval_batches
from tyrsearch.models import adapter_for
from tyrsearch.moe.moefy import MoefyConfig, expert_order, expert_scores, fit_router, gated_activations, mlp_io

NAME = "moefy"
RUNS = ROOT / "runs" / "bench-moefy"
CONFIGS = ((8, 2), (16, 4), (8, 4), (8, 6))  # 25% active at two granularities, then 50% and 75%
GOAL = 1.3
DISTILL_STEPS = 600
NEURON_SHARES = (0.25, 0.5, 0.75)
SPLITS = ((8, 2), (32, 8), (128, 32), (8, 4), (8, 6))  # 25% active ever finer, then 50% and 75%


def _tyrsearch(*args: str) -> dict:
    """Run a tyrsearch command with --json; its result."""
    done = subprocess.run([sys.executable, "-m", "tyrsearch.cli", *args, "--json"], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"tyrsearch {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def moefied(experts: int, top_k: int) -> dict:
    if (experts, top_k) == (8, 2) and (row := load("stun").get("rows", {}).get("moe")):
        return {**row["moefy"], "seconds": row["seconds"], "from": "results/stun.json"}
    tic = time.perf_counter()
    result = _tyrsearch("moefy", "--model", "smollm2-135m", "--experts", str(experts), "--top-k", str(top_k),
                        "--out", str(RUNS / f"e{experts}-k{top_k}"), "--overwrite")
    return {**result, "seconds": time.perf_counter() - tic}


def distilled() -> dict:
    """`tyrsearch distill` of the (8, 2) MoE (moefied here first if it is not on disk)."""
    student = RUNS / "e8-k2"
    if not (student / "config.json").is_file():
        _tyrsearch("moefy", "--model", "smollm2-135m", "--experts", "8", "--top-k", "2", "--out", str(student),
                   "--overwrite", "--eval-tokens", "0")
    out = RUNS / "e8-k2-distilled"
    if (out / "result.json").is_file():  # finished, but not yet recorded here
        return json.loads((out / "result.json").read_text())
    tic = time.perf_counter()
    result = _tyrsearch("distill", "--teacher", "smollm2-135m", "--student", str(student), "--out", str(out),
                        "--steps", str(DISTILL_STEPS))  # resumes from out's checkpoints if interrupted
    return {**result, "seconds": time.perf_counter() - tic}


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
    walker = LayerInputs(model, adapter, calibration_batches(tokenizer, texts.read_text("c4"), seq_len=512, count=32,
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


def _split_orders(calibration: torch.Tensor, model, adapter) -> list[dict[int, torch.Tensor]]:
    """Per layer, for each expert count of SPLITS: moefy's neuron order [I] (expert 0's neurons first)."""
    options, orders = MoefyConfig(), []
    walker = LayerInputs(model, adapter, calibration)
    for index, layer in enumerate(tqdm(adapter.layers(model), desc="expert splits", unit="layer")):
        x, _ = mlp_io(walker, layer.mlp)
        walker.advance(recompute=False)
        acts = gated_activations(layer.mlp, x)
        orders.append({experts: expert_order(acts, experts=experts, options=options, seed=index)
                       for experts in sorted({e for e, _ in SPLITS})})
    return orders


def _keep_neurons(share: float, down: torch.Tensor):
    """A pre-hook for down_proj that zeroes, per token, all but the ``share`` of neurons with the largest
    contributions |a_j| ||W_down[:, j]||."""
    column_norms = down.norm(dim=0)  # [I]

    def hook(module, args):
        acts = args[0]  # [b, L, I]
        index = (acts.abs() * column_norms).topk(round(share * acts.shape[-1]), dim=-1).indices
        return (torch.zeros_like(acts).scatter_(-1, index, acts.gather(-1, index)),)
    return hook


def _keep_experts(order: torch.Tensor, experts: int, top_k: int, down: torch.Tensor):
    """A pre-hook for down_proj that zeroes, per token, the neurons of all but the ``top_k`` experts whose
    outputs have the largest norms; ``order`` [I] lists expert 0's neurons, then expert 1's, ..."""
    size = order.numel() // experts
    down = down[:, order]  # [H, I], expert-ordered

    def hook(module, args):
        acts = args[0][..., order]  # [b, L, I], expert-ordered
        per_expert = acts.unflatten(-1, (experts, size))  # [b, L, E, m]
        norms = torch.einsum("blem,hem->bleh", per_expert, down.unflatten(1, (experts, size))).norm(dim=-1)  # [b, L, E]
        chosen = torch.zeros_like(norms).scatter_(-1, norms.topk(top_k, dim=-1).indices, 1.0)
        kept = torch.zeros_like(acts)
        kept[..., order] = acts * chosen.repeat_interleave(size, dim=-1)
        return (kept,)
    return hook


def _ppl_with(model, adapter, batches: torch.Tensor, hooks: list) -> float:
    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook)
               for layer, hook in zip(adapter.layers(model), hooks, strict=True)]
    try:
        return metrics.perplexity(model, batches, progress=False)["ppl"]
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def oracle_bounds() -> dict:
    """Held-out ppl of the dense model with the neuron oracle at each of NEURON_SHARES and the expert
    oracle at each of SPLITS."""
    model, tokenizer = assets.load_model("smollm2-135m")
    adapter = adapter_for(model)
    held_out = eval_batches(tokenizer, texts.read_text("wiki-summaries"), seq_len=512, max_tokens=16384)
    downs = [layer.mlp.down_proj.weight for layer in adapter.layers(model)]
    dense = metrics.perplexity(model, held_out, progress=False)["ppl"]
    bounds = {"dense_ppl": dense, "neurons": {}, "experts": {}}
    for share in tqdm(NEURON_SHARES, desc="neuron oracle"):
        ppl = _ppl_with(model, adapter, held_out, [_keep_neurons(share, down) for down in downs])
        bounds["neurons"][f"{share:g}"] = {"ppl": ppl, "ppl_ratio": ppl / dense}
    calibration = calibration_batches(tokenizer, texts.read_text("c4"), seq_len=512, count=32, seed=0)
    orders = _split_orders(calibration, model, adapter)
    for experts, top_k in tqdm(SPLITS, desc="expert oracle"):
        ppl = _ppl_with(model, adapter, held_out, [_keep_experts(layer[experts], experts, top_k, down)
                                                   for layer, down in zip(orders, downs, strict=True)])
        bounds["experts"][f"{experts}/{top_k}"] = {"ppl": ppl, "ppl_ratio": ppl / dense}
    return bounds


def markdown(rows: dict, routing: dict, bounds: dict, distilled: dict | None) -> str:
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
    text = [
        "\n".join(lines),
        f"Dense SmolLM2: held-out ppl {dense:.2f} (wiki-summaries, 16384 tokens at seq 512). Within {GOAL}x of it: "
        f"{', '.join(met) or 'none'}. Routing check at {routing['experts']} experts / top-{routing['top_k']}, MLP "
        f"output error without refit, mean over the {len(layers)} layers: fitted router {mean('router_error'):.3f}, "
        f"oracle {mean('oracle_error'):.3f} (worst layer {worst}: {layers[worst]['router_error']:.3f} / "
        f"{layers[worst]['oracle_error']:.3f}); router recall of the oracle's experts {mean('recall'):.2f}.",
    ]
    if distilled:
        text.append(f"Distilled (`tyrsearch distill`, {distilled['steps']} steps, {distilled['train_tokens']} c4 "
                    f"tokens, {distilled['train_s'] / 60:.0f} min): 8 / 2 held-out ppl "
                    f"{distilled['student_ppl_before']:.2f} -> {distilled['student_ppl']:.2f}, "
                    f"{distilled['ppl_ratio_before']:.2f}x -> {distilled['ppl_ratio']:.2f}x the dense model's.")
    text.append("Bounds without refit, held-out ppl ratio to dense: the neuron oracle keeps per token the neurons "
                "with the largest contributions; the expert oracle keeps the experts of moefy's split with the "
                "largest output norms.")
    text.append("\n".join(["| kept per token | ratio to dense |", "|---|---|"]
                          + [f"| top {float(share):.0%} of neurons | {row['ppl_ratio']:.2f}x |"
                             for share, row in bounds["neurons"].items()]
                          + [f"| top {key.split('/')[1]} of {key.split('/')[0]} experts | {row['ppl_ratio']:.2f}x |"
                             for key, row in bounds["experts"].items()]))
    return "\n\n".join(text) + "\n"


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
        save(NAME, data, "")
    if "bounds" not in data:
        data["bounds"] = oracle_bounds()
        save(NAME, data, "")
    if "distilled" not in data:
        data["distilled"] = distilled()
    data["environment"] = environment()
    save(NAME, data, markdown(rows, data["routing"], data["bounds"], data["distilled"]))


if __name__ == "__main__":
    main()

"""Latency-aware search on SmolLM2: the latency table against whole exported models, and searches under a
latency budget and over the quality / latency Pareto front, side by side with a parameter budget.

1. The table (`tyrsearch latency`: ONNX Runtime, prefill of 128 tokens at batch 1, last-position logits,
   every core), built afresh and timed; its estimates against measured whole models: dense, uniform 0.3
   and 0.5, a random per-layer plan, and the searched winners of benchmarks/results/search.json.
2. Three searches with one small schedule (1 iteration, 6 generations x 8 offspring; knapsack start):
   - params: `--budget params --target 0.3`;
   - latency: `--budget latency` with the limit at the params winner's estimated latency, so both are
     held to the same latency and only the budget's currency differs (latency trades attention against
     MLP blocks; params keeps each unit type's count);
   - pareto: `--objectives kl,latency` (NSGA-II, every candidate on 2048 tokens) around the same centre.
   For each winner: fitness (KL on 2048 tokens), held-out ppl, estimated and measured latency.

    .venv/bin/python benchmarks/latency.py               # about 40 minutes on 2 cores; resumable
    .venv/bin/python benchmarks/latency.py --remeasure   # timings again, searches kept
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

from report import ROOT, environment, load, save

from tyrsearch import allocation, assets
from tyrsearch.budget import LatencyTable
from tyrsearch.exporters.latency import Workload, check, machine_id, table_for
from tyrsearch.models import LayerShape, adapter_for
from tyrsearch.pruner import dims_of

NAME = "latency"
RUNS = ROOT / "runs" / "bench-latency"
EVAL_TOKENS = 16384
SPACE = """family: llama
units:
  q_heads: {min_keep: 0, step: 1}
  mlp: {min_keep: 0, step: 128}
levels: 4
iterations: 1
generations: 6
offspring: 8
selection:
  - {survivors: 8, tokens: 512}
  - {survivors: 2, tokens: 1024}
  - {survivors: 1, tokens: 2048}
fitness: {metric: kl, top_k: 256}
"""


def shapes_of(layers: list[dict]) -> list[LayerShape]:
    return [LayerShape(kv_heads=b["num_key_value_heads"] or 0,
                       q_per_kv=b["num_attention_heads"] // b["num_key_value_heads"] if b["num_attention_heads"] else 0,
                       intermediate=b["intermediate_size"]) for b in layers]


def held_out_ppl(run: dict) -> float:
    """The wiki-summaries ppl of a search's result (runs from before --eval-text held it alone)."""
    held_out = run["held_out"]
    return held_out["wiki-summaries"]["ppl"] if "wiki-summaries" in held_out else held_out["ppl"]


def search(label: str, *extra: str) -> dict:
    out = RUNS / label
    if (out / "result.json").is_file():
        return json.loads((out / "result.json").read_text())
    space = RUNS / "space.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text(SPACE)
    args = [sys.executable, "-m", "tyrsearch.cli", "search", "--model", "smollm2-135m", "--space", str(space),
            "--calib-seqs", "16", "--out", str(out), "--supernet-dir", str(RUNS / "supernets"),
            "--eval-tokens", str(EVAL_TOKENS), "--eval-text", "wiki-summaries", "--json",
            "--calib", "c4", "--sensitivity-seqs", "1", *extra]  # the settings its figures were measured with
    tic = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    result["wall_s"] = time.perf_counter() - tic
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--remeasure", action="store_true",
                        help="measure the table, the check and the winners' latencies again (on a quieter "
                             "machine), keeping the searches")
    parser.add_argument("--skip-searches", action="store_true", help="run no search that is not done yet")
    args = parser.parse_args()
    data = load(NAME)
    model, _ = assets.load_model("smollm2-135m")
    dense = adapter_for(model).shapes(model)
    workload = Workload()
    if args.remeasure:
        for key in ("table", "check", "measured"):
            data.pop(key, None)
    if "table" not in data or data["table"]["machine"] != machine_id(workload.intra_threads):
        tic = time.perf_counter()
        table, _ = table_for(model, workload, rebuild=True)
        data = {**{k: v for k, v in data.items() if k == "searches"}, "table": table.to_dict(),
                "table_s": time.perf_counter() - tic}
        save(NAME, data, "")
    table = LatencyTable.from_dict(data["table"])
    if "check" not in data:
        dims, rng = dims_of(model), random.Random(0)
        searched = load("search")["targets"]
        plans = {"dense": dense, "uniform 0.3": allocation.uniform(dense, sparsity=0.3, dims=dims),
                 "uniform 0.5 (attention 0.5)": allocation.uniform(dense, sparsity=0.5, attention_sparsity=0.5,
                                                                   dims=dims),
                 "random per-layer": [s.with_units("q_heads", rng.randint(0, s.q_per_kv))
                                      .with_units("mlp", rng.randint(0, s.intermediate)) for s in dense],
                 **{f"searched {t}": shapes_of(searched[t]["search"]["layers"]) for t in ("0.3", "0.5")}}
        data["check"] = check(model, table, plans, workload)
        save(NAME, data, "")
    runs = data.setdefault("searches", {})
    if "params" not in runs and not args.skip_searches:
        runs["params"] = search("params", "--budget", "params", "--target", "0.3", "--start", "knapsack")
        save(NAME, data, "")
    if "params" in runs:
        limit_ms = table.estimate(shapes_of(runs["params"]["layers"]))
        latency_target = f"{1 - limit_ms / table.estimate(dense):.4f}"
    if "latency" not in runs and not args.skip_searches:
        runs["latency"] = search("latency", "--budget", "latency", "--target", latency_target)
        save(NAME, data, "")
    if "pareto" not in runs and not args.skip_searches:
        runs["pareto"] = search("pareto", "--budget", "latency", "--target", latency_target,
                                "--objectives", "kl,latency")
        save(NAME, data, "")
    if runs and len(data.get("measured", [])) != len(runs):
        plans = {label: shapes_of(run["layers"]) for label, run in runs.items()}
        data["measured"] = check(model, table, plans, workload)
    data["environment"] = environment()
    save(NAME, data, markdown(data, table, dense))


def markdown(data: dict, table: LatencyTable, dense: list[LayerShape]) -> str:
    dense_ms = table.estimate(dense)
    lines = ["| model | estimate ms | measured ms | error |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['estimate_ms']:.1f} | {r['measured_ms']:.1f} | {r['error']:+.1%} |"
              for r in data["check"]]
    errors = [abs(r["error"]) for r in data["check"]]
    lines += ["", "| search | budget | KL (2048 tokens) | held-out ppl | latency ms est. / measured | "
              "vs dense (measured) | sparsity | trials | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    measured = {r["label"]: r for r in data.get("measured", [])}
    dense_measured = data["check"][0]["measured_ms"]
    for label, run in data["searches"].items():
        m = measured[label]
        lines.append(f"| {label} | {run['budget']['name']} {run['target']:.3f} | {run['fitness']['value']:.4f} | "
                     f"{held_out_ppl(run):.2f} | {m['estimate_ms']:.1f} / {m['measured_ms']:.1f} | "
                     f"{dense_measured / m['measured_ms']:.2f}x | {run['achieved_sparsity']:.3f} | "
                     f"{run['study']['trials']} | {run['wall_s']:.0f} |")
    front = data["searches"].get("pareto", {}).get("pareto_front", [])
    footer = (f"\nTable: {len(table.attention_ms)} attention shapes and {len(table.mlp_ms) - 1} MLP widths, "
              f"built in {data['table_s']:.0f} s on {table.machine}; base (embeddings, norms, lm_head for the last "
              f"position) {table.base_ms:.1f} ms, dense estimate {dense_ms:.1f} ms. Mean absolute estimate error "
              f"{sum(errors) / len(errors):.1%}, worst {max(errors):.1%}. Workload: ONNX Runtime CPU, prefill of "
              f"{table.seq_len} tokens at batch 1, last-position logits, {table.threads} threads; whole models "
              f"have random weights (latency depends on the shapes). Searches: SmolLM2, 1 iteration of 6 generations x "
              f"8 offspring, selection 8@512 -> 2@1024 -> 1@2048 (pareto: all on 2048), knapsack start, 16 x 512 "
              f"calibration tokens, held-out ppl on {EVAL_TOKENS} wiki-summaries tokens. Pareto front: {len(front)} "
              f"candidates from {front[0]['latency']:.1f} to {front[-1]['latency']:.1f} ms (KL {front[0]['kl']:.3f} "
              f"to {front[-1]['kl']:.3f}).\n" if front else "\n")
    return "\n".join(lines) + "\n" + footer


if __name__ == "__main__":
    main()

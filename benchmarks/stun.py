"""STUN on the moefied SmolLM2 against unstructured-only, frequency and random expert pruning, and the global
search's per-layer expert counts, side by side.

1. `tyrsearch moefy --model smollm2-135m --experts 8 --top-k 2`: the benchmark MoE (its ppl next to dense).
2. At total sparsity 0.4 and 0.6 (counted weights: attention, routers, experts), with 25% of the experts
   removed first (`--experts-keep 0.75`) and Wanda for the rest: `--method stun | frequency | random`;
   `--method none`: unstructured-only (Wanda) to the same total.
3. searched: `tyrsearch search --space moe --criterion stun` removes the same share of the weights as
   STUN's expert stage, with per-layer expert counts chosen by the evolution (fitness: KL to the MoE),
   then `tyrsearch stun --method none` brings it to the same total sparsity with Wanda.
Every model: held-out ppl and zero-shot accuracy (`tyrsearch eval`), the forward passes and wall time.

    .venv/bin/python benchmarks/stun.py     # resumable: finished steps are kept in runs/bench-stun
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from report import ROOT, environment, load, save

NAME = "stun"
RUNS = ROOT / "runs" / "bench-stun"
SPARSITIES = (0.4, 0.6)
METHODS = ("stun", "frequency", "random", "none")
EXPERTS_KEEP = "0.75"
EVAL_TOKENS = 16384
ZERO_SHOT = 50
CALIB_SEQS = 32


def cli(*args: str) -> tuple[dict, float]:
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tyrsearch.cli", *args, "--json"], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"tyrsearch {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), time.perf_counter() - tic


def step(data: dict, key: str, make) -> dict:
    """Run `make()` once: its result is kept in results/stun.json, so a rerun resumes."""
    if key not in data["rows"]:
        data["rows"][key] = make()
        save(NAME, data, "")
    return data["rows"][key]


def evaluated(folder) -> dict:
    result, seconds = cli("eval", "--model", str(folder), "--max-tokens", str(EVAL_TOKENS), "--zero-shot",
                          str(ZERO_SHOT))
    return {"ppl": result["ppl"], "zero_shot": result["zero_shot"], "eval_s": seconds}


def main() -> None:
    data = load(NAME) or {}
    data.setdefault("rows", {})
    moe = RUNS / "moe"
    step(data, "dense", lambda: evaluated("smollm2-135m"))

    def moefied():
        result, seconds = cli("moefy", "--model", "smollm2-135m", "--experts", "8", "--top-k", "2", "--out",
                              str(moe), "--overwrite")
        return {**evaluated(moe), "moefy": result, "seconds": seconds}

    step(data, "moe", moefied)
    for sparsity in SPARSITIES:
        for method in METHODS:
            def pruned(method=method, sparsity=sparsity):
                out = RUNS / f"{method}-{sparsity}"
                keep = [] if method == "none" else ["--experts-keep", EXPERTS_KEEP]
                result, seconds = cli("stun", "--model", str(moe), "--out", str(out), "--method", method, *keep,
                                      "--sparsity", str(sparsity), "--calib-seqs", str(CALIB_SEQS))
                return {**evaluated(out), "sparsity": result["sparsity"], "experts": result["experts"]["kept"],
                        "forward_passes": result["calibration"]["forward_passes"], "seconds": seconds}

            step(data, f"{method} {sparsity}", pruned)
    share = data["rows"][f"stun {SPARSITIES[0]}"]["sparsity"]["experts"]  # the expert stage's share of the weights

    def searched_experts():
        out = RUNS / "searched"
        result, seconds = cli("search", "--model", str(moe), "--space", "moe", "--criterion", "stun", "--target",
                              f"{share:.6f}", "--calib-seqs", str(CALIB_SEQS), "--out", str(out))
        return {"experts": [b.get("num_experts") for b in result["layers"]], "fitness": result["fitness"],
                "trials": result["study"]["trials"], "seconds": seconds, "times_s": result["times_s"]}

    search = step(data, "search", searched_experts)
    for sparsity in SPARSITIES:
        def searched(sparsity=sparsity):
            out = RUNS / f"searched-{sparsity}"
            rest = 1 - (1 - sparsity) / (1 - share)  # of the searched model's weights, to reach `sparsity` overall
            result, seconds = cli("stun", "--model", str(RUNS / "searched" / "model"), "--out", str(out), "--method",
                                  "none", "--sparsity", f"{rest:.6f}", "--calib-seqs", str(CALIB_SEQS))
            total = 1 - (1 - share) * (1 - result["sparsity"]["total"])
            return {**evaluated(out), "sparsity": {**result["sparsity"], "total": total, "experts": share},
                    "experts": search["experts"], "forward_passes": result["calibration"]["forward_passes"],
                    "seconds": seconds + search["seconds"]}

        step(data, f"searched {sparsity}", searched)
    data["environment"] = environment()
    save(NAME, data, markdown(data))


def markdown(data: dict) -> str:
    rows = data["rows"]
    tasks = sorted(rows["dense"]["zero_shot"])
    lines = ["| model | total sparsity | experts kept | held-out ppl | zero-shot mean | forward passes | wall s |",
             "|---|---|---|---|---|---|---|"]

    def mean_acc(row: dict) -> float:  # mean accuracy over the tasks
        return sum(task["acc"] for task in row["zero_shot"].values()) / len(row["zero_shot"])

    lines.append(f"| dense SmolLM2 | 0 | - | {rows['dense']['ppl']:.2f} | {mean_acc(rows['dense']):.3f} | - | - |")
    lines.append(f"| moefied (8 experts, top-2) | 0 | 240 | {rows['moe']['ppl']:.2f} | {mean_acc(rows['moe']):.3f} | "
                 f"- | {rows['moe']['seconds']:.0f} |")
    for sparsity in SPARSITIES:
        for method in (*METHODS, "searched"):
            row = rows.get(f"{method} {sparsity}")
            if row is None:
                continue
            label = "unstructured only (wanda)" if method == "none" else f"{method} + wanda"
            kept = sum(k for k in row["experts"] if k) if row["experts"] else 240
            lines.append(f"| {label} | {row['sparsity']['total']:.3f} | {kept} | {row['ppl']:.2f} | "
                         f"{mean_acc(row):.3f} | {row['forward_passes']} | {row['seconds']:.0f} |")
    goal = {s: (rows.get(f"stun {s}", {}).get("ppl"), rows.get(f"none {s}", {}).get("ppl"),
                rows.get(f"searched {s}", {}).get("ppl")) for s in SPARSITIES}
    stun6, none6, searched6 = goal[0.6]
    footer = (f"\nHeld-out wiki-summaries ppl at seq 512 on {EVAL_TOKENS} tokens; zero-shot: mean accuracy over "
              f"{', '.join(tasks) or 'the bundled tasks'} ({ZERO_SHOT} examples each). Calibration c4, "
              f"{CALIB_SEQS} x 512 tokens, one forward pass per 8 sequences. Expert stage: 25% of the experts "
              f"(--experts-keep {EXPERTS_KEEP}); the search removes the same share of the weights with per-layer "
              "counts (search_spaces/moe.yaml, STUN's experts at each count), its wall time includes the "
              "search. Goals at 0.6: STUN below unstructured-only: "
              f"{stun6 is not None and none6 is not None and stun6 < none6}; searched below STUN: "
              f"{stun6 is not None and searched6 is not None and searched6 < stun6}.\n")
    return "\n".join(lines) + "\n" + footer


if __name__ == "__main__":
    main()

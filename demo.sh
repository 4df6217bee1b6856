#!/usr/bin/env bash
# The demo: set up, search how much to prune in each layer of SmolLM2-135M at 30% sparsity (supernet +
# knapsack start + coarse-to-fine evolution as an Optuna study), save the winner as an HF folder,
# evaluate dense and pruned on held-out text, print the figures.
# (Once ONNX export lands, the winner is also exported and timed in ONNX Runtime.)
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
out=runs/demo
rm -rf "$out"
mkdir -p "$out"
tyr=.venv/bin/tyrsearch
eval_args=(--text wiki-summaries --seq-len 512 --max-tokens 16384 --json)
echo "== dense SmolLM2-135M on held-out wiki-summaries"
$tyr eval --model smollm2-135m "${eval_args[@]}" > "$out/dense.json"
echo "== searching the per-layer allocation for 30% sparsity (study: $out/search/study.db)"
$tyr search --model smollm2-135m --target 0.3 --out "$out/search" --json > "$out/search.json"
echo "== the winner, reloaded from $out/search/model"
$tyr eval --model "$out/search/model" "${eval_args[@]}" > "$out/pruned.json"
.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
dense, pruned, search = (json.load(open(f"{out}/{n}.json")) for n in ("dense", "pruned", "search"))
print(f"{'':8} {'ppl':>8} {'decoder params':>15} {'tokens/s':>9}")
for name, r in (("dense", dense), ("pruned", pruned)):
    print(f"{name:8} {r['ppl']:8.2f} {r['decoder_params']:15,} {r['tokens_per_s']:9.0f}")
fitness = " -> ".join(f"{it['start_fitness']:.4f}/{it['fitness']:.4f}" for it in search["iterations"])
print(f"sparsity {search['achieved_sparsity']:.3f}, ppl ratio {pruned['ppl'] / dense['ppl']:.2f}, "
      f"eval speedup {pruned['tokens_per_s'] / dense['tokens_per_s']:.2f}x, search took "
      f"{sum(search['times_s'].values()):.0f} s over {search['study']['trials']} trials "
      f"(KL start/winner per iteration: {fitness})")
print(f"model: {out}/search/model, report: {out}/search/report.html")
PY

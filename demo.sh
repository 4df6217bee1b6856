#!/usr/bin/env bash
# The demo: set up, prune SmolLM2-135M by 30% with the best one-shot method (OSSCAR units + the
# knapsack allocation over per-layer sensitivity curves), evaluate dense and pruned on held-out text,
# save the pruned model as an HF folder, print the figures.
# (Once the search lands, this searches the per-layer allocation and exports the winner to ONNX.)
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
out=runs/demo
mkdir -p "$out"
tyr=.venv/bin/tyrsearch
eval_args=(--text wiki-summaries --seq-len 512 --max-tokens 16384 --json)
echo "== dense SmolLM2-135M on held-out wiki-summaries"
$tyr eval --model smollm2-135m "${eval_args[@]}" > "$out/dense.json"
echo "== pruning 30% of the decoder parameters (osscar + knapsack allocation, 32 x 512 c4 calibration tokens)"
$tyr prune --model smollm2-135m --criterion osscar --allocation knapsack --sparsity 0.3 --calib c4 \
    --calib-seqs 32 --sensitivity-seqs 1 --out "$out/model" --overwrite --json > "$out/prune.json"
echo "== pruned model, reloaded from $out/model"
$tyr eval --model "$out/model" "${eval_args[@]}" > "$out/pruned.json"
.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
dense, pruned, prune = (json.load(open(f"{out}/{n}.json")) for n in ("dense", "pruned", "prune"))
print(f"{'':8} {'ppl':>8} {'decoder params':>15} {'tokens/s':>9}")
for name, r in (("dense", dense), ("pruned", pruned)):
    print(f"{name:8} {r['ppl']:8.2f} {r['decoder_params']:15,} {r['tokens_per_s']:9.0f}")
print(f"sparsity {prune['achieved_sparsity']:.3f}, ppl ratio {pruned['ppl'] / dense['ppl']:.2f}, "
      f"eval speedup {pruned['tokens_per_s'] / dense['tokens_per_s']:.2f}x, pruning took "
      f"{sum(prune['time_s'].values()):.0f} s; model saved in {out}/model")
PY

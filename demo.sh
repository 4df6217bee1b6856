#!/usr/bin/env bash
# The demo: set up, search how much to prune in each layer of SmolLM2-135M at 30% sparsity (supernet +
# knapsack start + coarse-to-fine evolution as an Optuna study), save the winner as an HF folder,
# evaluate dense and pruned on held-out text, export both to ONNX (fp32 and int8, verified in ONNX
# Runtime), time their prefill in ONNX Runtime, print the figures.
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
echo "== exporting dense and winner to ONNX, fp32 and int8, each verified in ONNX Runtime against torch"
dense_dir=$(.venv/bin/python -c 'from tyrsearch import assets; print(assets.resolve_model("smollm2-135m"))')
$tyr export --model "$dense_dir" --out "$out/onnx-dense/model.onnx" --int8 --json > "$out/export-dense.json"
$tyr export --model "$out/search/model" --out "$out/onnx-pruned/model.onnx" --int8 --json > "$out/export-pruned.json"
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

import statistics, time
import numpy as np
from tyrsearch.export.runtime import Decoder

ids = np.random.default_rng(0).integers(0, 49152, (1, 512))
def prefill_ms(path):  # median of 5 after a warm-up, batch 1, 512 tokens
    decoder = Decoder.load(path)
    decoder.logits(ids)
    times = []
    for _ in range(5):
        tic = time.perf_counter()
        decoder.logits(ids)
        times.append(time.perf_counter() - tic)
    return 1000 * statistics.median(times)

ms = {}
print(f"{'ONNX':8} {'verified':>8} {'fp32 ms':>8} {'int8 ms':>8} {'int8 ppl ratio':>15}  (prefill, 512 tokens)")
for name in ("dense", "pruned"):
    report = json.load(open(f"{out}/export-{name}.json"))
    ms[name] = [prefill_ms(f"{out}/onnx-{name}/{f}") for f in ("model.onnx", "model.int8.onnx")]
    print(f"{name:8} {str(report['verified']):>8} {ms[name][0]:8.1f} {ms[name][1]:8.1f} "
          f"{report['int8_verification']['held_out']['ppl_ratio']:15.3f}")
print(f"ONNX Runtime prefill speedup over dense fp32: pruned fp32 {ms['dense'][0] / ms['pruned'][0]:.2f}x, "
      f"pruned int8 {ms['dense'][0] / ms['pruned'][1]:.2f}x; folders: {out}/onnx-dense, {out}/onnx-pruned")
PY

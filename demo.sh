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
domains=(wiki-summaries literature code docs)  # held-out texts unlike the calibration (c4,wiki)
eval_args=(--seq-len 512 --max-tokens 8192 --json)
echo "== dense SmolLM2-135M on four held-out domains"
for text in "${domains[@]}"; do $tyr eval --model smollm2-135m --text "$text" "${eval_args[@]}" > "$out/dense-$text.json"; done
echo "== searching the per-layer allocation for 30% sparsity (study: $out/search/study.db)"
$tyr search --model smollm2-135m --target 0.3 --out "$out/search" --json > "$out/search.json"
echo "== the winner, reloaded from $out/search/model, on the same domains"
for text in "${domains[@]}"; do $tyr eval --model "$out/search/model" --text "$text" "${eval_args[@]}" > "$out/pruned-$text.json"; done
echo "== exporting dense and winner to ONNX, fp32 and int8, each verified in ONNX Runtime against torch"
dense_dir=$(.venv/bin/python -c 'from tyrsearch import assets; print(assets.resolve_model("smollm2-135m"))')
$tyr export --model "$dense_dir" --out "$out/onnx-dense/model.onnx" --int8 --json > "$out/export-dense.json"
$tyr export --model "$out/search/model" --out "$out/onnx-pruned/model.onnx" --int8 --json > "$out/export-pruned.json"
.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
domains = ("wiki-summaries", "literature", "code", "docs")
ev = {(m, d): json.load(open(f"{out}/{m}-{d}.json")) for m in ("dense", "pruned") for d in domains}
search = json.load(open(f"{out}/search.json"))
print(f"{'held-out ppl':14}" + "".join(f"{d:>15}" for d in domains) + f"{'decoder params':>16}")
for m in ("dense", "pruned"):
    print(f"{m:14}" + "".join(f"{ev[m, d]['ppl']:15.2f}" for d in domains) + f"{ev[m, domains[0]]['decoder_params']:16,}")
ratios = [ev["pruned", d]["ppl"] / ev["dense", d]["ppl"] for d in domains]
dense, pruned = ev["dense", domains[0]], ev["pruned", domains[0]]
fitness = " -> ".join(f"{it['start_fitness']:.4f}/{it['fitness']:.4f}" for it in search["iterations"])
print(f"sparsity {search['achieved_sparsity']:.3f}, ppl ratio per domain "
      f"{', '.join(f'{r:.2f}' for r in ratios)}, "
      f"eval speedup {pruned['tokens_per_s'] / dense['tokens_per_s']:.2f}x, search took "
      f"{sum(search['times_s'].values()):.0f} s over {search['study']['trials']} trials "
      f"(KL start/winner per iteration: {fitness})")
print(f"model: {out}/search/model, report: {out}/search/report.html")

import statistics, time
import numpy as np
from tyrsearch.exporters.runtime import Decoder

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

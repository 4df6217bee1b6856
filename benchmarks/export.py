"""SmolLM2 dense vs the searched winners at 0.3 and 0.5, exported to ONNX, side by side on this machine.

The winners' per-layer shapes come from benchmarks/results/search.json (the search benchmark); they are
cut here by one-shot osscar to those shapes (the latency depends on the shapes alone; the weights differ
a little from the search's own). Each model is exported twice (`tyrsearch export`): the prefill graph
and the KV-cache decoder graph, each also as dynamic int8 (its default: the MLP down projections smoothed
first); the prefill graph also as plain dynamic int8 (no smoothing), to show what smoothing buys. Figures,
per model:

- ONNX Runtime prefill latency at batch 1, seq 128 and 512 (median of --repeats), fp32, int8 and plain
  int8, and the held-out perplexity ratio of each int8 variant to fp32
- decode tokens/s with the KV cache (64 greedy tokens after a 128-token prompt; medians of --repeats), fp32
  and int8
- torch eager on the same inputs (prefill latency, decode tokens/s with its cache)
- file sizes, and the FLOP limit: dense FLOPs / pruned FLOPs per token (lm_head included)

Goals: prefill speedup at 0.5 at least 0.9x the FLOP limit; decode speedup at 0.5 at least 1.5x; int8 +
pruning at least 3x dense fp32 prefill.

    .venv/bin/python benchmarks/export.py        # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from report import ROOT, environment, load, save

from tyrsearch import assets, data, texts
from tyrsearch.exporters.onnx_export import held_out_change, quantize_int8
from tyrsearch.exporters.runtime import Decoder
from tyrsearch.local import make_criterion
from tyrsearch.materialize import save_pruned
from tyrsearch.models import LayerShape
from tyrsearch.pruner import prune

NAME = "export"
RUNS = ROOT / "runs" / "bench-export"
PREFILL = (128, 512)
PROMPT, NEW_TOKENS = 128, 64


def winner_folder(target: str, layers: list[dict]) -> Path:
    """SmolLM2 cut by one-shot osscar to the searched winner's per-layer shapes, saved (cached)."""
    folder = RUNS / f"searched-{target}"
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = assets.load_model("smollm2-135m")
    plan = [LayerShape(kv_heads=b["num_key_value_heads"],
                       q_per_kv=b["num_attention_heads"] // b["num_key_value_heads"] if b["num_key_value_heads"] else 0,
                       intermediate=b["intermediate_size"]) for b in layers]
    calib = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=512, count=32, seed=0)
    prune(model, plan, make_criterion("osscar"), calib)
    save_pruned(model, tokenizer, folder)
    return folder


def export(folder: Path, out: Path, *flags: str) -> dict:
    if (out.parent / "export.json").is_file():
        return json.loads((out.parent / "export.json").read_text())
    command = [sys.executable, "-m", "tyrsearch.cli", "export", "--model", str(folder), "--out", str(out),
               "--int8", "--json", *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"export of {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def decode_tokens_per_s(step_all, prompt: np.ndarray, repeats: int) -> float:
    """New tokens per second of greedy decoding after the prompt (the prefill step not counted), from the
    median times of `repeats` runs with and without the new tokens."""
    prefill = timed(lambda: step_all(prompt, 1), repeats)
    whole = timed(lambda: step_all(prompt, NEW_TOKENS + 1), repeats)
    return NEW_TOKENS / max(1e-9, whole - prefill)


def flops_per_token(config: dict, layers: list[dict], context: int) -> float:
    """2 x (decoder linear + lm_head weights) + attention scores and values at `context` keys, per token."""
    hidden, dim, vocab = config["hidden_size"], config["head_dim"], config["vocab_size"]
    total = 2 * hidden * vocab  # lm_head
    for b in layers:
        q, kv, inter = b["num_attention_heads"], b["num_key_value_heads"], b["intermediate_size"]
        total += 2 * hidden * dim * (2 * q + 2 * kv) + 2 * 3 * hidden * inter + 4 * context * q * dim
    return total


def measure(label: str, folder: Path, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exports = {graph: export(folder, RUNS / label / graph / "model.onnx", *flags)
               for graph, flags in (("prefill", ()), ("kv", ("--kv-cache",)))}
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    layers = config.get("block_configs") or [{"num_attention_heads": config["num_attention_heads"],
                                              "num_key_value_heads": config["num_key_value_heads"],
                                              "intermediate_size": config["intermediate_size"]}
                                             ] * config["num_hidden_layers"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prefill_dir = RUNS / label / "prefill"
    plain = prefill_dir / "model.int8-plain.onnx"
    if not plain.is_file():
        quantize_int8(prefill_dir / "model.onnx", plain, method="dynamic")
    plain_held_out = held_out_change(prefill_dir / "model.onnx", plain, AutoTokenizer.from_pretrained(prefill_dir),
                                     tokens=exports["prefill"]["config"]["ppl_tokens"])
    ids = torch.randint(0, config["vocab_size"], (1, max(PREFILL)), generator=torch.Generator().manual_seed(0))
    row = {"label": label, "files_mb": {}, "prefill_ms": {}, "decode_tokens_per_s": {},
           "verified": all(e["verified"] for e in exports.values()),
           "int8_ppl_ratio": exports["prefill"]["int8_verification"]["held_out"]["ppl_ratio"],
           "int8_plain_ppl_ratio": plain_held_out["ppl_ratio"],
           "flops_per_token": {seq: flops_per_token(config, layers, seq // 2) for seq in PREFILL}}
    for graph, report in exports.items():
        for name, size in report["files"].items():
            if name.endswith((".onnx", ".onnx.data")):
                row["files_mb"][f"{graph}/{name}"] = size / 2**20
    for precision, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"), ("int8_plain", plain.name)):
        prefill = Decoder.load(prefill_dir / file)
        for seq in PREFILL:
            x = ids[:, :seq].numpy()
            row["prefill_ms"][f"ort_{precision}_{seq}"] = 1000 * timed(lambda x=x, p=prefill: p.logits(x), repeats)
        if precision != "int8_plain":  # decode: the two exported graphs
            decoder = Decoder.load(RUNS / label / "kv" / file)
            row["decode_tokens_per_s"][f"ort_{precision}"] = decode_tokens_per_s(decoder.greedy,
                                                                                 ids[:, :PROMPT].numpy(), repeats)
    with torch.inference_mode():
        for seq in PREFILL:
            x = ids[:, :seq]
            row["prefill_ms"][f"torch_{seq}"] = 1000 * timed(lambda x=x: model(x, use_cache=False), repeats)

        def torch_greedy(prompt: np.ndarray, new: int) -> None:
            x = torch.from_numpy(prompt)
            model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0)

        row["decode_tokens_per_s"]["torch"] = decode_tokens_per_s(torch_greedy, ids[:, :PROMPT].numpy(), repeats)
    print(json.dumps({k: row[k] for k in ("label", "prefill_ms", "decode_tokens_per_s")}), flush=True)
    return row


def table(results: dict) -> str:
    rows = results["models"]
    dense = rows[0]
    lines = ["| model | prefill 128 ms fp32 / int8 / torch | prefill 512 ms fp32 / int8 / torch | speedup 512 "
             "(FLOP limit) | decode tok/s fp32 / int8 / torch | int8 ppl ratio | plain int8 prefill 128 / 512 ms "
             "(ppl ratio) | files MB fp32 / int8 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, d = r["prefill_ms"], r["decode_tokens_per_s"]
        limit = dense["flops_per_token"][512] / r["flops_per_token"][512]
        fp32_mb = sum(v for k, v in r["files_mb"].items() if k.startswith("prefill/model.onnx"))
        int8_mb = r["files_mb"].get("prefill/model.int8.onnx", 0.0)
        lines.append(f"| {r['label']} | {p['ort_fp32_128']:.1f} / {p['ort_int8_128']:.1f} / {p['torch_128']:.1f} | "
                     f"{p['ort_fp32_512']:.1f} / {p['ort_int8_512']:.1f} / {p['torch_512']:.1f} | "
                     f"{dense['prefill_ms']['ort_fp32_512'] / p['ort_fp32_512']:.2f}x ({limit:.2f}x) | "
                     f"{d['ort_fp32']:.1f} / {d['ort_int8']:.1f} / {d['torch']:.1f} | {r['int8_ppl_ratio']:.3f} | "
                     f"{p['ort_int8_plain_128']:.1f} / {p['ort_int8_plain_512']:.1f} "
                     f"({r['int8_plain_ppl_ratio']:.3f}) | "
                     f"{fp32_mb:.0f} / {int8_mb:.0f} |")
    goals = results["goals"]
    return "\n".join(lines) + (
        f"\n\nGoals at 0.5: prefill speedup / FLOP limit {goals['prefill_vs_flop_limit']:.2f} (goal 0.9); decode "
        f"speedup {goals['decode_speedup']:.2f}x (goal 1.5x); int8 + pruning prefill "
        f"{goals['int8_pruned_prefill']:.2f}x dense fp32 (goal 3x; plain int8 "
        f"{goals['int8_plain_pruned_prefill']:.2f}x). ONNX Runtime on the CPUExecutionProvider with its default "
        "threads (2 cores), batch 1; every export verified against torch (fp32 parity, greedy generation equal).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    searched = load("search")["targets"]
    models = [("dense", assets.resolve_model("smollm2-135m")),
              *((f"searched {t}", winner_folder(t, searched[t]["search"]["layers"])) for t in ("0.3", "0.5"))]
    rows = [measure(label.replace(" ", "-"), folder, args.repeats) for label, folder in models]
    for row, (label, _) in zip(rows, models, strict=True):
        row["label"] = label
    dense, half = rows[0], rows[-1]
    limit = dense["flops_per_token"][512] / half["flops_per_token"][512]
    goals = {"prefill_vs_flop_limit": dense["prefill_ms"]["ort_fp32_512"] / half["prefill_ms"]["ort_fp32_512"] / limit,
             "decode_speedup": half["decode_tokens_per_s"]["ort_fp32"] / dense["decode_tokens_per_s"]["ort_fp32"],
             "int8_pruned_prefill": dense["prefill_ms"]["ort_fp32_512"] / half["prefill_ms"]["ort_int8_512"],
             "int8_plain_pruned_prefill": dense["prefill_ms"]["ort_fp32_512"]
             / half["prefill_ms"]["ort_int8_plain_512"]}
    results = {"settings": {"prefill": PREFILL, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "repeats": args.repeats},
               "environment": environment(), "models": rows, "goals": goals}
    save(NAME, results, table(results))


if __name__ == "__main__":
    main()

"""The searched SmolLM2 winners in the edge runtimes people deploy with, against the dense model:
onnxruntime-genai (fp32 and int8 graphs of `tyrsearch export --kv-cache --int8`) and llama.cpp through
llama-cpp-python (`tyrsearch export --format gguf` at f16, q8_0 and q4_k_m).

Per model (dense; the 0.3 and 0.5 winners of benchmarks/search.py, runs/bench-search/tT/model) and runtime,
side by side in one run: prompt processing (512 tokens) and generation (64 tokens) tokens/s at batch 1 on 2
threads, file size, held-out perplexity over torch's fp32 on the same tokens (ONNX: 2048 wiki-summaries
tokens in ONNX Runtime; llama.cpp: the same through its logits), and whether the full-precision export's
greedy tokens equal torch's. Exports go under runs/edge/ and are reused.

    .venv/bin/python benchmarks/edge.py                     # after benchmarks/search.py (about 30 min)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from report import ROOT, environment, load, save

import tyrsearch
from tyrsearch import data, metrics, texts
from tyrsearch.exporters import genai, llamacpp

NAME = "edge"
RUNS = ROOT / "runs" / "edge"
SEARCHES = ROOT / "runs" / "bench-search"
PROMPT, GENERATE, THREADS = 512, 64, 2
GGUF = ("f16", "q8_0", "q4_k_m")
GOAL = {"q8_0_generate_speedup_at_0.5": 1.6}


def models(args) -> dict[str, str]:
    found = {"dense": "smollm2-135m"}
    for target in args.targets:
        folder = args.searches / f"t{target}" / "model"
        if not folder.is_dir():
            raise SystemExit(f"{folder} is missing: run benchmarks/search.py --targets {target} first")
        found[f"searched {target}"] = str(folder)
    return found


def prompt_ids() -> list[int]:
    return torch.randint(0, 49152, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()


def onnx_report(name: str, model: str) -> tuple[Path, dict]:
    out = RUNS / name.replace(" ", "-") / "onnx" / "model.onnx"
    report = json.loads((out.parent / "export.json").read_text()) if out.exists() else \
        tyrsearch.export(model, out=out, kv_cache=True, int8=True).figures
    return out, report


def onnx_ppl_ratios(model: str, report: dict) -> dict[str, float]:
    """The fp32 and int8 graphs' held-out perplexity in ONNX Runtime (export's figures: 2048 wiki-summaries
    tokens in windows of 256) over torch fp32's on the same windows."""
    loaded = tyrsearch.api.load(model)
    ids = data.eval_batches(loaded.tokenizer, texts.read_text("wiki-summaries"), seq_len=256, max_tokens=2048)
    torch_ppl = metrics.perplexity(loaded.model, ids, progress=False)["ppl"]
    held_out = report["int8_verification"]["held_out"]
    return {"fp32": held_out["ppl_fp32"] / torch_ppl, "int8": held_out["ppl_int8"] / torch_ppl}


def onnx_rows(name: str, model: str) -> dict:
    out, report = onnx_report(name, model)
    ratios, rows = onnx_ppl_ratios(model, report), {}
    for precision, graph, check in (("fp32", out, report["verification"]),
                                    ("int8", out.with_suffix(".int8.onnx"), report["int8_verification"])):
        size = sum(p.stat().st_size for p in out.parent.glob(graph.name + "*"))
        rows[f"onnxruntime-genai {precision}"] = {
            **genai.speed(graph, prompt_ids(), GENERATE, threads=THREADS), "bytes": size,
            "ppl_ratio": ratios[precision],
            "greedy_equal": check["genai"].get("equal_to_torch", check["genai"].get("equal_to_onnxruntime"))}
    return rows


def gguf_rows(name: str, model: str) -> dict:
    rows = {}
    for quant in GGUF:
        out = RUNS / name.replace(" ", "-") / f"model.{quant}.gguf"
        if out.exists():
            out.unlink()  # the verification figures come with the export
        report = tyrsearch.export(model, out=out, format="gguf", quant=quant).figures
        speed = llamacpp.Runner(out, context=PROMPT + GENERATE + 8, threads=THREADS).speed(prompt_ids(), GENERATE)
        check = report["verification"]
        rows[f"llama.cpp {quant}"] = {**speed, "bytes": out.stat().st_size,
                                      "ppl_ratio": check["held_out"]["ppl_ratio"],
                                      "greedy_equal": check["generation"]["equal_to_torch"]}
    return rows


def table(results: dict) -> str:
    lines = ["| model | runtime | prompt tok/s (512) | generate tok/s | x dense | file MB | held-out ppl / torch fp32 "
             "| greedy = torch |", "|---|---|---|---|---|---|---|---|"]
    dense = results["models"].get("dense", {})
    for name, rows in results["models"].items():
        for runtime, row in rows.items():
            speedup = row["generate_tokens_per_s"] / dense[runtime]["generate_tokens_per_s"] if runtime in dense \
                else float("nan")
            lines.append(f"| {name} | {runtime} | {row['prompt_tokens_per_s']:.0f} | "
                         f"{row['generate_tokens_per_s']:.1f} | {speedup:.2f} | {row['bytes'] / 1e6:.0f} | "
                         f"{row['ppl_ratio']:.3f} | {'yes' if row['greedy_equal'] else 'no'} |")
    lines += ["", f"Batch 1, {THREADS} threads, a {PROMPT}-token prompt then {GENERATE} generated tokens; each "
              "runtime timed in this process, one after the other. Held-out ppl: 2048 wiki-summaries tokens in "
              "windows of 256, over torch fp32's on the same windows. Greedy: 32 tokens after a random prompt, "
              "fp32 and f16 against torch, int8 against ONNX Runtime on the same graph, q8_0/q4_k_m against torch "
              "(reported, not required)."]
    return "\n".join(lines) + "\n"


def run(args) -> None:
    results = load(NAME)
    results.update(environment=environment(), settings={"prompt": PROMPT, "generate": GENERATE,
                                                        "threads": THREADS})
    results.setdefault("models", {})
    for name, model in models(args).items():
        if name in results["models"] and not args.again:
            continue
        print(name, flush=True)
        tic = time.perf_counter()
        results["models"][name] = {**onnx_rows(name, model), **gguf_rows(name, model)}
        print(f"  {time.perf_counter() - tic:.0f} s", flush=True)
        save(NAME, results, table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--searches", type=Path, default=SEARCHES, help="benchmarks/search.py's run folders")
    parser.add_argument("--again", action="store_true", help="measure models already in the results again")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

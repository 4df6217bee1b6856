"""The searched SmolLM2 winners in the edge runtimes people deploy with, against the dense model:
onnxruntime-genai (fp32 and int8 graphs of `tyrsearch export --kv-cache --int8`) and llama.cpp through
llama-cpp-python (`tyrsearch export --format gguf` at f16, q8_0 and q4_k_m).

Models: dense; the 0.3 and 0.5 winners of the default space (benchmarks/search.py's runs/bench-search/tT);
the 0.5 winner of `--space llama-heads` (runs/bench-search-llama-heads/tT), which may drop whole attention
blocks, the per-token work llama.cpp spends outside the matrix products (benchmarks/llamacpp_overhead.py).
A search that is not there is made here as search.py makes it (seed 0, 32 calibration sequences).

Per model and runtime, side by side in one run: prompt processing (512 tokens) and generation (64 tokens)
tokens/s at batch 1 on 2 threads, file size, held-out perplexity over torch's fp32 on the same tokens (ONNX:
2048 wiki-summaries tokens in ONNX Runtime; llama.cpp: the same through its logits), and whether the
full-precision export's greedy tokens equal torch's. Exports go under runs/edge/ and are reused. Speeds:
every runtime of every model loaded at once, then `--repeats` rounds that each time every one once
(interleaved, so the machine's drift falls on dense and pruned alike); a row has the median and the range.
llama.cpp is timed as its own tools run it: the last position's logits only, flash attention on.

    .venv/bin/python benchmarks/edge.py          # missing searches 22-31 min each, then about 30 min
    .venv/bin/python benchmarks/edge.py --targets 0.5 --heads-targets   # dense and the 0.5 winner only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from report import ROOT, environment, load, save, shared_search
from tqdm.auto import tqdm

import tyrsearch
from tyrsearch import data, metrics, texts
from tyrsearch.exporters import genai, llamacpp

NAME = "edge"
MODEL = "smollm2-135m"
RUNS = ROOT / "runs" / "edge"
SEARCHES = ROOT / "runs" / "bench-search"
HEADS = "llama-heads"  # the space whose winners may drop attention blocks
PROMPT, GENERATE, THREADS = 512, 64, 2
GGUF = ("f16", "q8_0", "q4_k_m")
GOAL = 1.6  # llama.cpp q8_0 generation of a 0.5 winner over the dense model's
# timed as llama.cpp's own tools run: the last position's logits only, flash attention on (their CPU default)
LLAMA_CPP = {"all_logits": False, "flash_attention": True}


def models(args) -> dict[str, str]:
    found = {"dense": MODEL}
    for target in args.targets:
        found[f"searched {target}"] = str(shared_search(args.searches / f"t{target}", target) / "model")
    heads = args.searches.with_name(f"{args.searches.name}-{HEADS}")
    for target in args.heads_targets:
        found[f"searched {target} {HEADS}"] = str(shared_search(heads / f"t{target}", target, space=HEADS) / "model")
    return found


def prompt_ids() -> list[int]:
    return torch.randint(0, 49152, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()


def exports(name: str) -> Path:
    """The folder of a model's exports (ONNX under onnx/, GGUF files beside it)."""
    return RUNS / name.replace(" ", "-")


def onnx_report(name: str, model: str) -> tuple[Path, dict]:
    out = exports(name) / "onnx" / "model.onnx"
    report = json.loads((out.parent / "export.json").read_text()) if out.exists() else \
        tyrsearch.export(model, out=out, kv_cache=True, int8=True).figures
    return out, report


def onnx_ppls(model: str, report: dict) -> tuple[dict[str, float], float]:
    """The fp32 and int8 graphs' held-out perplexity in ONNX Runtime (export's figures: 2048 wiki-summaries
    tokens in windows of 256), and torch fp32's on the same windows."""
    loaded = tyrsearch.api.load(model)
    ids = data.eval_batches(loaded.tokenizer, texts.read_text("wiki-summaries"), seq_len=256, max_tokens=2048)
    torch_ppl = metrics.perplexity(loaded.model, ids, progress=False)["ppl"]
    held_out = report["int8_verification"]["held_out"]
    return {"fp32": held_out["ppl_fp32"], "int8": held_out["ppl_int8"]}, torch_ppl


def onnx_rows(name: str, model: str) -> dict:
    out, report = onnx_report(name, model)
    (ppls, torch_ppl), rows = onnx_ppls(model, report), {}
    for precision, graph, check in (("fp32", out, report["verification"]),
                                    ("int8", out.with_suffix(".int8.onnx"), report["int8_verification"])):
        size = sum(p.stat().st_size for p in out.parent.glob(graph.name + "*"))
        rows[f"onnxruntime-genai {precision}"] = {
            "bytes": size, "ppl": ppls[precision], "ppl_ratio": ppls[precision] / torch_ppl,
            "greedy_equal": check["genai"].get("equal_to_torch", check["genai"].get("equal_to_onnxruntime"))}
    return rows


def gguf_rows(name: str, model: str) -> dict:
    rows = {}
    for quant in GGUF:
        out = exports(name) / f"model.{quant}.gguf"
        if out.exists():
            out.unlink()  # the verification figures come with the export
        report = tyrsearch.export(model, out=out, format="gguf", quant=quant).figures
        check = report["verification"]
        rows[f"llama.cpp {quant}"] = {"bytes": out.stat().st_size, "ppl": check["held_out"]["ppl_llama_cpp"],
                                      "ppl_ratio": check["held_out"]["ppl_ratio"],
                                      "greedy_equal": check["generation"]["equal_to_torch"]}
    return rows


def exported(name: str) -> bool:
    folder = exports(name)
    return (folder / "onnx" / "model.int8.onnx").exists() and all(
        (folder / f"model.{quant}.gguf").exists() for quant in GGUF)


def runners(name: str) -> dict:
    """The model's exports, each loaded in its runtime: runtime name -> an object with `speed()`."""
    folder = exports(name)
    graph = folder / "onnx" / "model.onnx"
    found = {f"onnxruntime-genai {precision}": genai.Runner(path, threads=THREADS)
             for precision, path in (("fp32", graph), ("int8", graph.with_suffix(".int8.onnx")))}
    for quant in GGUF:
        found[f"llama.cpp {quant}"] = llamacpp.Runner(folder / f"model.{quant}.gguf", context=PROMPT + GENERATE + 8,
                                                      threads=THREADS, **LLAMA_CPP)
    return found


def time_speeds(results: dict, names: list[str], repeats: int) -> None:
    """Every runtime of every model in `names` timed `repeats` times, interleaved, after one untimed warm-up
    each; each row gets the median tokens/s and the [lowest, highest]."""
    loaded = {(name, runtime): runner for name in names for runtime, runner in runners(name).items()}
    prompt = prompt_ids()
    for runner in loaded.values():
        runner.speed(prompt, GENERATE)  # first touch of the weights, allocations
    runs = {key: [] for key in loaded}
    for _ in tqdm(range(repeats), desc="timing rounds"):
        for key, runner in loaded.items():
            runs[key].append(runner.speed(prompt, GENERATE))
    for (name, runtime), measured in runs.items():
        row = results["models"][name][runtime]
        for what in ("prompt_tokens_per_s", "generate_tokens_per_s"):
            values = [m[what] for m in measured]
            row[what], row[what + "_range"] = statistics.median(values), [min(values), max(values)]


def table(results: dict) -> str:
    lines = ["| model | runtime | prompt tok/s (512) | generate tok/s (range) | x dense | file MB "
             "| held-out ppl (/ torch fp32) | greedy = torch |", "|---|---|---|---|---|---|---|---|"]
    dense = results["models"].get("dense", {})
    for name, rows in results["models"].items():
        for runtime, row in rows.items():
            speedup = row["generate_tokens_per_s"] / dense[runtime]["generate_tokens_per_s"] if runtime in dense \
                else float("nan")
            low, high = row["generate_tokens_per_s_range"]
            lines.append(f"| {name} | {runtime} | {row['prompt_tokens_per_s']:.0f} | "
                         f"{row['generate_tokens_per_s']:.1f} ({low:.1f}-{high:.1f}) | {speedup:.2f} | "
                         f"{row['bytes'] / 1e6:.0f} | "
                         f"{row['ppl']:.2f} ({row['ppl_ratio']:.3f}) | {'yes' if row['greedy_equal'] else 'no'} |")
    lines += ["", f"Batch 1, {THREADS} threads, a {PROMPT}-token prompt then {GENERATE} generated tokens; medians "
              f"of {results['settings']['repeats']} interleaved rounds, every runtime of every model loaded in this "
              "process (range: the slowest and fastest round). Held-out ppl: 2048 wiki-summaries tokens in windows "
              "of 256 through the runtime; in parentheses over torch fp32's on the same windows (the runtime's "
              "fidelity; the models' quality on four domains: benchmarks/transfer.py). Greedy: 32 tokens after a "
              "random prompt, fp32 and f16 against torch, int8 against ONNX Runtime on the same graph, q8_0/q4_k_m "
              "against torch "
              f"(reported, not required). llama.cpp timed with {_llama_cpp_setting(results['settings'])}."]
    if "goal" in results:
        goal = results["goal"]
        each = ", ".join(f"{name} {speedup:.2f}x" for name, speedup in goal["speedups"].items())
        lines += ["", f"Goal (llama.cpp q8_0 generation of a 0.5 winner at least {goal['at_least']}x the dense "
                  f"model's): {'met' if goal['met'] else 'missed'} ({each})."]
    return "\n".join(lines) + "\n"


def _llama_cpp_setting(settings: dict) -> str:
    how = settings["llama_cpp"]
    return (("every position's logits" if how["all_logits"] else "the last position's logits only")
            + (", flash attention" if how["flash_attention"] else ", no flash attention"))


def check_goal(results: dict) -> None:
    rows = results["models"]
    dense = rows["dense"]["llama.cpp q8_0"]["generate_tokens_per_s"]
    speedups = {name: row["llama.cpp q8_0"]["generate_tokens_per_s"] / dense for name, row in rows.items()
                if name.startswith("searched 0.5")}
    if speedups:
        results["goal"] = {"at_least": GOAL, "speedups": speedups, "met": max(speedups.values()) >= GOAL}


def run(args) -> None:
    """Each model's exports and quality figures (reused unless --again or the exports are gone), then one
    interleaved timing pass over every model of this run; rows of models not in this run are dropped, so
    every speed in the table comes from the same pass."""
    results = load(NAME)
    results.pop("goal", None)
    results.update(environment=environment(), settings={"prompt": PROMPT, "generate": GENERATE,
                                                        "threads": THREADS, "repeats": args.repeats,
                                                        "llama_cpp": LLAMA_CPP})
    chosen = models(args)
    results["models"] = {name: rows for name, rows in results.get("models", {}).items() if name in chosen}
    for name, model in chosen.items():
        if name in results["models"] and exported(name) and not args.again:
            continue
        print(name, flush=True)
        tic = time.perf_counter()
        results["models"][name] = {**onnx_rows(name, model), **gguf_rows(name, model)}
        print(f"  {time.perf_counter() - tic:.0f} s", flush=True)
    results["models"] = {name: results["models"][name] for name in chosen}  # the table's order
    time_speeds(results, list(chosen), args.repeats)
    check_goal(results)
    save(NAME, results, table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="*", default=[0.3, 0.5], help="the default space's winners")
    parser.add_argument("--heads-targets", type=float, nargs="*", default=[0.5], help=f"{HEADS} winners")
    parser.add_argument("--searches", type=Path, default=SEARCHES, help="benchmarks/search.py's run folders")
    parser.add_argument("--again", action="store_true", help="export and check models already in the results again")
    parser.add_argument("--repeats", type=int, default=7, help="timing rounds (each times every runtime once)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

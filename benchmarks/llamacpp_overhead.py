"""Where llama.cpp's generation time goes on SmolLM2 at q8_0: the part of a token's time that shrinks with
the weights and the part that does not, under the settings that change it.

Two models of the same 30 layers: dense, and uniform 0.5 with MLP channels only (`tyrsearch prune
--sparsity 0.5`, osscar; the shapes benchmarks/edge.py's 0.5 winner has, give or take each layer's
width). Per runner setting, side by side in one run: prompt processing (512 tokens) and generation (64
tokens) tokens/s at batch 1 on 2 threads, medians of --repeats interleaved rounds, and a two-point fit of
ms per token against file bytes: `fixed ms` is what a token costs with no weights at all (per-layer
operators, thread hand-offs, attention over the cache, the Python call), the ceiling on what pruning the
weights alone can win.

Settings: every position's logits kept (what a perplexity needs; no flash attention, as llama-cpp-python
defaults to), the last position's logits only (llama.cpp's own tools), plus flash attention (their CPU
default, `-fa auto`; how benchmarks/edge.py times llama.cpp), and generation from an empty cache (no prompt:
no attention over 512 positions).

    .venv/bin/python benchmarks/llamacpp_overhead.py        # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from edge import GENERATE, PROMPT, THREADS, prompt_ids
from report import ROOT, environment, save
from tqdm.auto import tqdm

import tyrsearch
from tyrsearch.exporters import llamacpp

NAME = "llamacpp_overhead"
MODEL = "smollm2-135m"
RUNS = ROOT / "runs" / "llamacpp-overhead"
SETTINGS = {  # name -> (Runner keywords, prompt tokens before the generated ones)
    "every position's logits": ({"all_logits": True}, PROMPT),
    "last logits only": ({"all_logits": False}, PROMPT),
    "last logits, flash attention": ({"all_logits": False, "flash_attention": True}, PROMPT),
    "last logits, flash attention, empty cache": ({"all_logits": False, "flash_attention": True}, 1),
}


def gguf_files() -> dict[str, str]:
    """Dense and uniform 0.5 at q8_0, made unless they are there."""
    pruned = RUNS / "uniform-0.5"
    if not (pruned / "result.json").is_file():
        tyrsearch.prune(MODEL, sparsity=0.5, out=pruned, calib_seqs=32, overwrite=True, progress=False)
    files = {}
    for name, model in (("dense", MODEL), ("uniform 0.5", str(pruned))):
        out = RUNS / f"{name.replace(' ', '-')}.q8_0.gguf"
        if not out.exists():
            tyrsearch.export(model, out=out, format="gguf", quant="q8_0")
        files[name] = str(out)
    return files


def run(args) -> None:
    files = gguf_files()
    prompt = prompt_ids()  # edge.py's
    loaded = {(model, setting): llamacpp.Runner(path, context=PROMPT + GENERATE + 8, threads=THREADS, **how)
              for model, path in files.items() for setting, (how, _) in SETTINGS.items()}
    timed = {key: [] for key in loaded}
    for round_ in tqdm(range(args.repeats + 1), desc="timing rounds"):
        for (model, setting), runner in loaded.items():
            measured = runner.speed(prompt[:SETTINGS[setting][1]], GENERATE)
            if round_:  # the first round only warms up
                timed[model, setting].append(measured)
    sizes = {model: Path(path).stat().st_size for model, path in files.items()}
    results = {"environment": environment(), "settings": {"prompt": PROMPT, "generate": GENERATE,
                                                          "threads": THREADS, "repeats": args.repeats},
               "bytes": sizes, "rows": {}}
    for setting in SETTINGS:
        row = {model: {what: statistics.median(m[what] for m in timed[model, setting])
                       for what in ("prompt_tokens_per_s", "generate_tokens_per_s")} for model in files}
        ms = {model: 1e3 / row[model]["generate_tokens_per_s"] for model in files}
        per_byte = (ms["dense"] - ms["uniform 0.5"]) / (sizes["dense"] - sizes["uniform 0.5"])
        results["rows"][setting] = {**row, "speedup": ms["dense"] / ms["uniform 0.5"],
                                    "fixed_ms": ms["dense"] - per_byte * sizes["dense"], "dense_ms": ms["dense"]}
    save(NAME, results, table(results))


def table(results: dict) -> str:
    lines = ["| runner setting | generate tok/s dense / 0.5 | x dense | ms per token dense | fixed ms (share) "
             "| prompt tok/s dense / 0.5 |", "|---|---|---|---|---|---|"]
    for setting, row in results["rows"].items():
        dense, pruned = row["dense"], row["uniform 0.5"]
        prompt = "-" if SETTINGS[setting][1] == 1 else \
            f"{dense['prompt_tokens_per_s']:.0f} / {pruned['prompt_tokens_per_s']:.0f}"
        lines.append(f"| {setting} | {dense['generate_tokens_per_s']:.1f} / {pruned['generate_tokens_per_s']:.1f} "
                     f"| {row['speedup']:.2f} | {row['dense_ms']:.2f} | {row['fixed_ms']:.2f} "
                     f"({row['fixed_ms'] / row['dense_ms']:.0%}) | {prompt} |")
    mb = {model: size / 1e6 for model, size in results["bytes"].items()}
    lines += ["", f"q8_0 files: dense {mb['dense']:.0f} MB, uniform 0.5 {mb['uniform 0.5']:.0f} MB "
              f"({mb['dense'] / mb['uniform 0.5']:.2f}x). Batch 1, {THREADS} threads, {GENERATE} generated tokens "
              f"after a {PROMPT}-token prompt (empty cache: after one token); medians of "
              f"{results['settings']['repeats']} interleaved rounds. Fixed ms: the two-point fit's ms per token "
              "at zero bytes."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timing rounds (each times every setting once)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

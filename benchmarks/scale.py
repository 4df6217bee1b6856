"""How tyrsearch's cost grows with model size, on the CPU, in bfloat16 and float32.

Random-weight Llama models with the shapes of SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.2-3B
(SmolLM2's tokenizer and vocabulary; random weights change neither time nor memory), saved once as bf16
safetensors under runs/scale/. For each shape and dtype, each in a fresh process:

- prune: what `tyrsearch prune --criterion osscar --allocation uniform --sparsity 0.3 --calib-seqs 8
  --seq-len 512 --dtype D --out ...` does (load, calibrate, prune, save): wall time, peak resident memory
  (VmHWM), and the pruning time split into the OBS solves (`Osscar.select`) and the layer walk (forward
  passes and statistics);
- supernet: the search's supernet build (osscar, the family's space, 32 x 512 calibration tokens) per
  layer, measured on the first two layers;
- candidate: one candidate's fitness on 512 tokens, every layer assembled from a supernet.

Beside each: the layer's work, the walk's matmul FLOPs (2 x tokens x layer weights, twice: statistics and
the sequential recompute) and the solves' (about 4 D^3 for an MLP of D channels: the inverse, the OBS
updates, the refit). Memory goal: pruning the 3B shape in bf16 peaks at most 1.3x its weights + 2 GiB.

    .venv/bin/python benchmarks/scale.py                                        # hours on 2 cores
    .venv/bin/python benchmarks/scale.py --shapes smollm2-135m --dtypes bfloat16 --measures prune
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from report import RESULTS, ROOT, environment, load, save

NAME = "scale"
FOLDERS = ROOT / "runs" / "scale"
CALIB_SEQS, SEQ_LEN, SPARSITY = 8, 512, 0.3
SUPERNET_SEQS, SUPERNET_LAYERS = 32, 2
GOAL = {"shape": "llama-3.2-3b", "dtype": "bfloat16", "times_weights": 1.3, "plus_gib": 2.0}


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int


SHAPES = {
    "smollm2-135m": Shape(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536),
    "qwen2.5-0.5b": Shape(layers=24, hidden=896, heads=14, kv_heads=2, ffn=4864),
    "llama-3.2-1b": Shape(layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192),
    "llama-3.2-3b": Shape(layers=28, hidden=3072, heads=24, kv_heads=8, ffn=8192),
}
MEASURES = ("prune", "supernet", "candidate")


def made(name: str) -> Path:
    """The shape's random bf16 model folder (made once)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tyrsearch import assets

    folder = FOLDERS / name
    if (folder / "config.json").exists():
        return folder
    shape = SHAPES[name]
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve_model("smollm2-135m"))
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # no float32 copy of a 3B model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.tie_weights()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peak_bytes() -> int:
    """This process's peak resident memory (VmHWM: ru_maxrss would keep the parent's across fork and exec)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


# -- the measurements, each run in a child process ----------------------------------------------------------


def measure_prune(folder: Path, dtype: torch.dtype) -> dict:
    from tyrsearch import allocation, assets, data, metrics, texts
    from tyrsearch.local.osscar import Osscar
    from tyrsearch.materialize import save_pruned
    from tyrsearch.models import adapter_for
    from tyrsearch.pruner import dims_of, prune
    from tyrsearch.streaming import weight_bytes

    class TimedOsscar(Osscar):
        seconds = 0.0

        def select_many(self, group, keeps):
            tic = time.perf_counter()
            try:
                return super().select_many(group, keeps)
            finally:
                TimedOsscar.seconds += time.perf_counter() - tic

    tic = time.perf_counter()
    model, tokenizer = assets.load_model(str(folder), dtype=dtype)
    weights, params = weight_bytes(model), metrics.total_params(model)
    batches = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=SEQ_LEN, count=CALIB_SEQS, seed=0)
    dense = adapter_for(model).shapes(model)
    plan = allocation.uniform(dense, sparsity=SPARSITY, attention_sparsity=0.0, dims=dims_of(model))
    walk = time.perf_counter()
    prune(model, plan, TimedOsscar(), batches, progress=False)
    pruned, pruning_peak = time.perf_counter(), peak_bytes()
    with tempfile.TemporaryDirectory() as out:
        save_pruned(model, tokenizer, Path(out) / "model")
    return {"params": params, "weights_bytes": weights, "wall_s": time.perf_counter() - tic, "prune_s": pruned - walk,
            "solve_s": TimedOsscar.seconds, "walk_s": pruned - walk - TimedOsscar.seconds,
            "peak_bytes": peak_bytes(), "peak_before_save_bytes": pruning_peak}


def measure_supernet(folder: Path, dtype: torch.dtype) -> dict:
    from tyrsearch import allocation, assets, data, texts
    from tyrsearch.local.osscar import Osscar
    from tyrsearch.models import adapter_for
    from tyrsearch.pruner import dims_of
    from tyrsearch.space import load_space
    from tyrsearch.supernet import build_supernet

    model, tokenizer = assets.load_model(str(folder), dtype=dtype)
    model.model.layers = model.model.layers[:SUPERNET_LAYERS]  # the cost per layer does not depend on depth
    model.config.num_hidden_layers = SUPERNET_LAYERS
    adapter = adapter_for(model)
    dense = adapter.shapes(model)
    centre = allocation.uniform(dense, sparsity=SPARSITY, attention_sparsity=0.0, dims=dims_of(model))
    batches = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=SEQ_LEN, count=SUPERNET_SEQS,
                                       seed=0)
    tic = time.perf_counter()
    build_supernet(model, Osscar(), batches, space=load_space(adapter.search_space), centre=centre, progress=False)
    return {"per_layer_s": (time.perf_counter() - tic) / SUPERNET_LAYERS, "peak_bytes": peak_bytes()}


def measure_candidate(folder: Path, dtype: torch.dtype) -> dict:
    from tyrsearch import allocation, assets, data, metrics, texts
    from tyrsearch.local.magnitude import Magnitude
    from tyrsearch.models import adapter_for
    from tyrsearch.pruner import dims_of
    from tyrsearch.search.candidates import CandidateEvaluator
    from tyrsearch.space import load_space
    from tyrsearch.supernet import build_supernet

    model, tokenizer = assets.load_model(str(folder), dtype=dtype)
    adapter = adapter_for(model)
    centre = allocation.uniform(adapter.shapes(model), sparsity=SPARSITY, attention_sparsity=0.0,
                                dims=dims_of(model))
    batch = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=SEQ_LEN, count=1, seed=0)
    # the variants' values do not change the cost of assembling and running them: magnitude builds fast
    supernet = build_supernet(model, Magnitude(), batch, space=load_space(adapter.search_space), centre=centre,
                              progress=False)
    reference = metrics.dense_topk(model, batch, k=64, progress=False)
    evaluator = CandidateEvaluator(model=model, supernet=supernet, reference=reference)
    levels = [{unit: 0 for unit in units} for units in supernet.grid]
    tic = time.perf_counter()
    evaluator.fitness(levels, 1, reuse=False)
    return {"seconds": time.perf_counter() - tic, "peak_bytes": peak_bytes()}


CHILDREN = {"prune": measure_prune, "supernet": measure_supernet, "candidate": measure_candidate}


def child(measure: str, name: str, dtype: str) -> dict:
    """One measurement in a fresh process (its own peak memory), returning its JSON."""
    command = [sys.executable, __file__, "--child", measure, name, dtype]
    ran = subprocess.run(command, capture_output=True, text=True)
    if ran.returncode != 0:
        raise RuntimeError(f"{measure} {name} {dtype} failed:\n{ran.stderr[-3000:]}")
    return json.loads(ran.stdout.strip().splitlines()[-1])


# -- the layer's work -----------------------------------------------------------------------------------


def layer_weights(shape: Shape) -> int:
    head_dim = shape.hidden // shape.heads
    attention = 2 * shape.hidden * shape.heads * head_dim + 2 * shape.hidden * shape.kv_heads * head_dim
    return attention + 3 * shape.hidden * shape.ffn


def work(shape: Shape) -> dict:
    """Per layer: the walk's matmul FLOPs on the calibration tokens (statistics pass and sequential
    recompute) and the solves' (inverse, OBS updates and refit of the D x D MLP problem, about 4 D^3)."""
    tokens = CALIB_SEQS * SEQ_LEN
    return {"walk_gflop": 2 * 2 * tokens * layer_weights(shape) / 1e9, "solve_gflop": 4 * shape.ffn ** 3 / 1e9}


def summarize(results: dict) -> None:
    for row in results["rows"].values():
        shape = SHAPES[row["shape"]]
        row["work"] = work(shape)
        prune = row.get("prune")
        if prune:
            prune["per_layer_s"] = prune["prune_s"] / shape.layers
            prune["peak_over_weights"] = prune["peak_bytes"] / prune["weights_bytes"]
            prune["solve_share"] = prune["solve_s"] / prune["prune_s"]
            if row["shape"] == GOAL["shape"] and row["dtype"] == GOAL["dtype"]:
                limit = GOAL["times_weights"] * prune["weights_bytes"] + GOAL["plus_gib"] * 2 ** 30
                prune["memory_goal"] = {"limit_bytes": limit, "met": prune["peak_bytes"] <= limit}


def table(results: dict) -> str:
    lines = ["| shape | params | dtype | weights GB | prune wall s | per layer s (solves %) | peak RSS GB "
             "(x weights) | supernet s/layer | candidate s (512 tok) | walk / solve GFLOP per layer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(results["rows"].values(), key=lambda r: (r.get("params") or 0, r["dtype"])):
        prune, supernet, candidate = row.get("prune"), row.get("supernet"), row.get("candidate")
        cells = [row["shape"], f"{row['params'] / 1e9:.2f} B", row["dtype"]]
        cells += [f"{prune['weights_bytes'] / 1e9:.2f}", f"{prune['wall_s']:.0f}",
                  f"{prune['per_layer_s']:.1f} ({100 * prune['solve_share']:.0f}%)",
                  f"{prune['peak_bytes'] / 1e9:.2f} ({prune['peak_over_weights']:.2f}x)"] if prune else ["-"] * 4
        cells.append(f"{supernet['per_layer_s']:.1f}" if supernet else "-")
        cells.append(f"{candidate['seconds']:.2f}" if candidate else "-")
        cells.append(f"{row['work']['walk_gflop']:.0f} / {row['work']['solve_gflop']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    goals = [r["prune"]["memory_goal"] for r in results["rows"].values() if "memory_goal" in r.get("prune", {})]
    goal = goals[0] if goals else None
    if goal:
        lines.append(f"\nMemory goal ({GOAL['shape']}, {GOAL['dtype']}: peak at most {GOAL['times_weights']}x the "
                     f"weights + {GOAL['plus_gib']:.0f} GiB = {goal['limit_bytes'] / 1e9:.2f} GB): "
                     f"{'met' if goal['met'] else 'missed'}.")
    return "\n".join(lines) + "\n"


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for dtype in ("bfloat16", "float32"):
        rows = sorted((r for r in results["rows"].values() if r["dtype"] == dtype and "prune" in r),
                      key=lambda r: r["params"])
        if not rows:
            continue
        params = [r["params"] for r in rows]
        time_axis.loglog(params, [r["prune"]["prune_s"] for r in rows], "o-", label=f"prune, {dtype}")
        memory_axis.loglog(params, [r["prune"]["peak_bytes"] / 1e9 for r in rows], "o-", label=f"peak RSS, {dtype}")
        memory_axis.loglog(params, [r["prune"]["weights_bytes"] / 1e9 for r in rows], "x--",
                           label=f"weights, {dtype}")
    time_axis.set(xlabel="parameters", ylabel="seconds", title="one-shot osscar 30%, 8 x 512 tokens")
    memory_axis.set(xlabel="parameters", ylabel="GB", title="host memory")
    for axis in (time_axis, memory_axis):
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no overlapping labels
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{NAME}.png", dpi=100)


def run(args) -> None:
    results = load(NAME)
    results.update(settings={"calib": [CALIB_SEQS, SEQ_LEN], "sparsity": SPARSITY, "criterion": "osscar",
                             "supernet": {"calib": [SUPERNET_SEQS, SEQ_LEN], "layers": SUPERNET_LAYERS},
                             "shapes": {n: asdict(s) for n, s in SHAPES.items()}}, environment=environment())
    results.setdefault("rows", {})
    for name in args.shapes:
        made(name)
        for dtype in args.dtypes:
            row = results["rows"].setdefault(f"{name} {dtype}", {"shape": name, "dtype": dtype})
            for measure in args.measures:
                if measure in row:
                    continue
                print(f"{name} {dtype}: {measure}", flush=True)
                row[measure] = child(measure, name, dtype)
                row.setdefault("params", row[measure].get("params"))
                summarize(results)
                save(NAME, results, table(results))
    summarize(results)
    save(NAME, results, table(results))
    plot(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    parser.add_argument("--child", nargs=3, metavar=("MEASURE", "SHAPE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure, name, dtype = args.child
        torch.set_grad_enabled(False)
        print(json.dumps(CHILDREN[measure](FOLDERS / name, getattr(torch, dtype))))
        return
    run(args)


if __name__ == "__main__":
    main()

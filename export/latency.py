"""The latency table: ONNX Runtime milliseconds of each decoder block shape on this machine.

Workload: a prefill of `seq_len` tokens at batch 1 with the logits of the last position (what the first
step of generation needs), ONNX Runtime on the CPU with `threads` intra-op threads.

Every probe is a real export (the exporter and graph of `tyrsearch export`) of a random-weight model,
built with the per-layer-shaped classes:

    block probe   PROBE_LAYERS layers, each with the attention shape (MLP removed) or the MLP width
                  (attention removed) measured, and a tiny vocabulary
    empty probe   the same with both blocks removed: a block costs (probe - empty) / PROBE_LAYERS
    base          the dense depth with every block removed and the real vocabulary: embeddings, norms,
                  residual adds and the lm_head, what no unit removes

A model's estimate is base + the sum of its blocks (MLP widths between the measured grid are linear).
Tables are cached per machine (host, CPU, threads, onnxruntime version) and model dimensions, so they
are measured once. `check` compares estimates with whole exported models.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tyrsearch import allocation, assets
from tyrsearch.atomic import write_json
from tyrsearch.budget import LatencyTable
from tyrsearch.exporters.onnx_export import ExportConfig, write_graph
from tyrsearch.materialize import pruned_config
from tyrsearch.modeling import PRUNED_CLASSES
from tyrsearch.models import LayerShape, adapter_for, base_model_type

PROBE_LAYERS = 4  # layers per block probe: the block's cost is measured R times over, above the noise
PROBE_VOCAB = 128


@dataclass(frozen=True)
class Workload:
    seq_len: int = 128
    threads: int = 0  # 0: every core of this machine
    repeats: int = 20  # timed runs per probe (after warm-up); the fastest counts
    mlp_step: int = 128  # MLP widths measured: multiples of this, and the dense width

    @property
    def intra_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


def machine_id(threads: int) -> str:
    """What a table's figures hold for: this host and CPU, the thread count and onnxruntime's version."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{platform.node()} | {cpu} | {threads} threads | onnxruntime {ort.__version__}"


def model_id(model: PreTrainedModel) -> str:
    """The dense dimensions a table is for (weights do not change latency)."""
    config = model.config
    shape = adapter_for(model).shapes(model)[0]
    head_dim = adapter_for(model).head_dim(model)
    return (f"{base_model_type(config.model_type)} hidden {config.hidden_size} head_dim {head_dim} "
            f"heads {shape.q_heads}/{shape.kv_heads} intermediate {shape.intermediate} "
            f"layers {config.num_hidden_layers} vocab {config.vocab_size}")


def probe(model: PreTrainedModel, shapes: list[LayerShape], *, vocab: int) -> PreTrainedModel:
    """A random-weight model with `model`'s dimensions and one layer per shape (fp32, eager attention)."""
    blocks = [s.block_config() for s in shapes]
    config = pruned_config(model.config, blocks, num_hidden_layers=len(blocks), vocab_size=vocab)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return PRUNED_CLASSES[base_model_type(model.config.model_type)][1](config).float().eval()


def time_graph(path: Path, *, seq_len: int, vocab: int, threads: int, repeats: int) -> float:
    """Milliseconds of one prefill of `seq_len` tokens at batch 1: the fastest of `repeats` runs, what the
    machine does undisturbed (other processes only ever add time), so tables are comparable between runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, seq_len), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - tic) * 1e3)
    return min(times)


def measure(model: PreTrainedModel, workload: Workload) -> float:
    """Milliseconds of `model` exported as the workload's prefill graph."""
    with tempfile.TemporaryDirectory(prefix="tyrsearch-latency-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_graph(model, path, ExportConfig(last_only=True))
        return time_graph(path, seq_len=workload.seq_len, vocab=model.config.vocab_size,
                          threads=workload.intra_threads, repeats=workload.repeats)


def build_table(model: PreTrainedModel, workload: Workload, *, progress: bool = True) -> LatencyTable:
    """Measure every attention shape (kv_heads x q_per_kv up to the dense ones) and the MLP widths."""
    dense = adapter_for(model).shapes(model)[0]
    empty = dense.with_units("q_heads", 0).with_units("kv_groups", 0).with_units("mlp", 0)
    attention = [empty.with_units("kv_groups", kv).with_units("q_heads", q)
                 for kv, q in itertools.product(range(1, dense.kv_heads + 1), range(1, dense.q_per_kv + 1))]
    widths = sorted({*range(workload.mlp_step, dense.intermediate, workload.mlp_step), dense.intermediate})
    mlp = [empty.with_units("mlp", width) for width in widths]
    probes = [("base", [empty] * model.config.num_hidden_layers, model.config.vocab_size),
              ("empty", [empty] * PROBE_LAYERS, PROBE_VOCAB),
              *((shape, [shape] * PROBE_LAYERS, PROBE_VOCAB) for shape in attention + mlp)]
    figures = {}
    for key, shapes, vocab in tqdm(probes, desc="latency probes", disable=not progress, unit="probe"):
        figures[key if isinstance(key, str) else (key.kv_heads, key.q_per_kv, key.intermediate)] = \
            measure(probe(model, shapes, vocab=vocab), workload)

    def block(shape: LayerShape) -> float:  # noise can make a tiny block look negative: it costs >= 0
        return max(0.0, (figures[(shape.kv_heads, shape.q_per_kv, shape.intermediate)] - figures["empty"])
                   / PROBE_LAYERS)

    # more channels or heads never cost less: noise on small blocks says otherwise, and a price that falls
    # as a layer grows would hand the knapsack negative savings
    mlp_ms = np.maximum.accumulate([block(s) for s in mlp]).tolist()
    attention_grid = np.array([block(s) for s in attention]).reshape(dense.kv_heads, dense.q_per_kv)  # [kv, q]
    attention_grid = np.maximum.accumulate(np.maximum.accumulate(attention_grid, axis=0), axis=1)
    return LatencyTable(machine=machine_id(workload.intra_threads), model=model_id(model),
                        seq_len=workload.seq_len, threads=workload.intra_threads, base_ms=figures["base"],
                        attention_ms={(s.kv_heads, s.q_per_kv): float(ms)
                                      for s, ms in zip(attention, attention_grid.flat, strict=True)},
                        mlp_ms={0: 0.0, **dict(zip(widths, mlp_ms, strict=True))})


def cache_file(model: PreTrainedModel, workload: Workload) -> Path:
    # one table per machine, model and workload: how finely it was measured is not part of the key, so a
    # search finds the table `tyrsearch latency` built with any --mlp-step or --repeats
    key = json.dumps([machine_id(workload.intra_threads), model_id(model), workload.seq_len])
    return assets.cache_dir() / "latency" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def table_for(model: PreTrainedModel, workload: Workload, *, rebuild: bool = False,
              progress: bool = True) -> tuple[LatencyTable, bool]:
    """This machine's table for `model`'s dimensions: from the cache, or measured and cached. Also says
    whether it came from the cache."""
    path = cache_file(model, workload)
    if path.is_file() and not rebuild:
        return LatencyTable.from_dict(json.loads(path.read_text())), True
    table = build_table(model, workload, progress=progress)
    write_json(path, table.to_dict())  # readers see the whole table or none
    return table, False


def check(model: PreTrainedModel, table: LatencyTable, plans: dict[str, list[LayerShape]],
          workload: Workload, *, progress: bool = True) -> list[dict]:
    """Estimate against measurement for whole models of the given per-layer shapes (random weights, the
    real vocabulary): label, estimate_ms, measured_ms and the relative error of the estimate."""
    rows = []
    for label, shapes in tqdm(plans.items(), desc="whole models", disable=not progress, unit="model"):
        measured = measure(probe(model, shapes, vocab=model.config.vocab_size), workload)
        estimate = table.estimate(shapes)
        rows.append({"label": label, "estimate_ms": estimate, "measured_ms": measured,
                     "error": (estimate - measured) / measured})
    return rows


def measure_model(model_ref: str, workload: Workload, *, check_models: int = 4, rebuild: bool = False,
                  seed: int = 0) -> dict:
    """`tyrsearch latency`: the table of `model_ref`'s blocks (cached per machine) and its estimates checked
    against up to four whole models (dense, uniform 0.3 and 0.5, a random per-layer plan)."""
    import random

    from tyrsearch.pruner import dims_of

    model, _ = assets.load_model(model_ref)
    tic = time.perf_counter()
    table, cached = table_for(model, workload, rebuild=rebuild)
    built_s = time.perf_counter() - tic
    dense, dims = adapter_for(model).shapes(model), dims_of(model)
    rng = random.Random(seed)
    plans = {"dense": dense, "uniform 0.3": allocation.uniform(dense, sparsity=0.3, dims=dims),
             "uniform 0.5 (attention 0.5)": allocation.uniform(dense, sparsity=0.5, attention_sparsity=0.5, dims=dims),
             "random per-layer": [s.with_units("q_heads", rng.randint(0, s.q_per_kv))
                                  .with_units("mlp", rng.randint(0, s.intermediate)) for s in dense]}
    rows = check(model, table, dict(list(plans.items())[:check_models]), workload)
    return {"model": model_ref, "table_file": str(cache_file(model, workload)), "cached": cached,
            "seconds": built_s, **table.to_dict(), "dense_estimate_ms": table.estimate(dense), "check": rows,
            "mean_abs_error": sum(abs(r["error"]) for r in rows) / len(rows) if rows else None}

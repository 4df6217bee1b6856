"""The global search on SmolLM2 as a user runs it (`tyrsearch.search` with today's defaults) against the
one-shot allocations (`tyrsearch.prune`, uniform and owl) with the same local pruner (osscar).

Per target sparsity, side by side in one run: held-out `wiki-summaries` perplexity (seq 512) of uniform,
OWL, the search's knapsack start and its winner; wall time of supernet building, the sensitivity pass and
the search; the candidate evaluation ratio (cheap evaluation over a full forward of the same candidates on
the same tokens, replayed on generations of the last iteration); the supernet's disk size over the dense
model's. Rows are saved as they finish and searches resume from their study, so an interrupted run
continues. A finished run folder is reused as it is (its result.json says what was searched and how long
it took), so a folder that `benchmarks/transfer.py` searched with the same settings can be copied in.

    .venv/bin/python benchmarks/search.py                   # targets 0.3 and 0.5 (about 1 h on 2 cores)
    .venv/bin/python benchmarks/search.py --targets 0.5 --space my-small-space.yaml
    .venv/bin/python benchmarks/search.py --targets 0.5 --dtype bfloat16    # the same in bf16, side by side
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import optuna
import torch
from report import ROOT, environment, load, save

import tyrsearch
from tyrsearch import assets, data, metrics, texts
from tyrsearch.allocation import sparsity_of
from tyrsearch.models import adapter_for
from tyrsearch.search import study as schema
from tyrsearch.search.candidates import CandidateEvaluator
from tyrsearch.search.driver import join_study, start_candidate
from tyrsearch.search.job import Job
from tyrsearch.search.storage import open_storage
from tyrsearch.search.study import GENERATION, ITERATION
from tyrsearch.search.worker import params_to_levels, reference_for
from tyrsearch.space import load_space
from tyrsearch.supernet import Supernet

NAME = "search"
MODEL = "smollm2-135m"
HELD_OUT = "wiki-summaries"
RUNS = ROOT / "runs" / "bench-search"


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def evaluation_ratio(out: Path, study_name: str, dense, tokenizer, *, generations: int) -> dict:
    """Replay the last `generations` generations of the last iteration: every candidate evaluated as in the
    search (parent's cached hidden states, nested stages) and as a full forward on the same tokens. The
    study holds all a worker needs (job, space, supernet folder), so the replay rebuilds it as one does."""
    study, space = join_study(storage=open_storage(f"sqlite:///{out / 'study.db'}"), study_name=study_name)
    job = Job(**schema.job(study))
    reference = reference_for(dense, job.batches(tokenizer, space).fitness, space, batch_size=job.batch_size)
    stage_sequences = [-(-stage.tokens // job.seq_len) for stage in space.selection]
    iteration = schema.current_iteration(study)
    supernet = Supernet.load(schema.iteration_record(study, iteration).supernet)
    layers = len(adapter_for(dense).shapes(dense))
    trials = [t for t in study.trials if t.system_attrs.get(ITERATION) == iteration
              and t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    last = max(t.system_attrs[GENERATION] for t in trials)
    cheap = full = 0.0
    evaluated = 0
    for generation in range(max(1, last - generations + 1), last + 1):
        earlier = [t for t in trials if t.system_attrs[GENERATION] < generation and t.state.name == "COMPLETE"]
        parent = min(earlier, key=lambda t: (t.value, t.number))
        evaluator = CandidateEvaluator(model=dense, supernet=supernet, reference=reference,
                                       metric=space.fitness.metric)
        evaluator.set_parent(params_to_levels(parent.params, layers))
        for trial in (t for t in trials if t.system_attrs[GENERATION] == generation):
            levels = params_to_levels(trial.params, layers)
            for step in sorted(trial.intermediate_values):
                tic = time.perf_counter()
                evaluator.fitness(levels, stage_sequences[step])
                cheap += time.perf_counter() - tic
                tic = time.perf_counter()
                evaluator.fitness(levels, stage_sequences[step], reuse=False)
                full += time.perf_counter() - tic
                evaluated += 1
    return {"ratio": cheap / full, "evaluations": evaluated, "cheap_s": cheap, "full_s": full}


def searched(out: Path, target: float, calib_seqs: int, space: str | None, dtype: str) -> dict:
    """result.json of the search into `out`: run (or resumed) through the API unless it finished before."""
    result = out / "result.json"
    if not result.exists():
        tyrsearch.search(MODEL, target=target, out=out, calib_seqs=calib_seqs, space=space, seed=0, dtype=dtype,
                         resume=(out / "study.db").exists())
    figures = json.loads(result.read_text())
    asked = {"source": texts.DEFAULT_CALIB, "sequences": calib_seqs, "seq_len": 512, "seed": 0}
    if figures["calibration"] != asked or figures["target"] != target:
        raise SystemExit(f"{out} holds another search ({figures['calibration']}, target {figures['target']}): "
                         "move it away or point --runs elsewhere")
    return figures


def table(results: dict) -> str:
    lines = ["| target | allocation | achieved sparsity | ppl | ppl / dense | ppl / uniform |",
             "|---|---|---|---|---|---|"]
    dense = results.get("dense", {}).get("ppl")
    for target, row in sorted(results.get("targets", {}).items()):
        uniform = row["ppl"].get("uniform")
        for name in ("uniform", "owl", "knapsack start", "searched"):
            if name in row["ppl"]:
                ppl = row["ppl"][name]
                lines.append(f"| {target} | {name} | {row['sparsity'][name]:.4f} | {ppl:.2f} | {ppl / dense:.2f} | "
                             f"{ppl / uniform:.2f} |" if uniform else "")
    lines += ["", "| target | supernet build s | sensitivity s | search s | trials | fitness start -> winner | "
              "candidate eval ratio | supernet disk / dense |", "|---|---|---|---|---|---|---|---|"]
    for target, row in sorted(results.get("targets", {}).items()):
        if "search" not in row:
            continue
        s = row["search"]
        fit = " -> ".join(f"{it['start_fitness']:.4f}/{it['fitness']:.4f}" for it in s["iterations"])
        lines.append(f"| {target} | {s['times_s']['supernet']:.0f} | {s['times_s']['sensitivity']:.0f} | "
                     f"{s['times_s']['search']:.0f} | {s['trials']} | {fit} | {s['evaluation']['ratio']:.2f} | "
                     f"{s['supernet_disk_ratio']:.2f} |")
    st = results.get("settings", {})
    lines += ["", f"SmolLM2-135M in {st.get('dtype', 'float32')}, dense ppl {dense:.2f}. Held-out `{HELD_OUT}` "
              "ppl at seq 512 on "
              f"{st.get('eval_tokens')} tokens; calibration `{st.get('calib')}` {st.get('calib_seqs')} x 512 tokens; "
              "local pruner osscar everywhere (`tyrsearch.prune` and `tyrsearch.search`, defaults). uniform/owl keep "
              f"attention dense; the search runs its space ({st.get('space')}: {st.get('iterations')} iterations x "
              f"{st.get('generations')} generations x {st.get('offspring')} offspring, selection "
              f"{st.get('selection')}). Fitness column: per iteration, start/winner fitness on the last stage's "
              "tokens. Candidate eval ratio: cheap evaluation / full forward of the same candidates on the same "
              "tokens (replayed last generations). Supernet disk: the last iteration's shards over the dense "
              "model's weights."]
    return "\n".join(lines) + "\n"


def run(args) -> None:
    name = NAME if args.dtype == "float32" else f"{NAME}-{args.dtype}"
    runs = args.runs or (RUNS if args.dtype == "float32" else RUNS.with_name(f"{RUNS.name}-{args.dtype}"))
    dtype = getattr(torch, args.dtype)
    results = load(name)
    space = load_space(args.space or "llama")
    settings = {"eval_tokens": args.eval_tokens, "calib": texts.DEFAULT_CALIB, "calib_seqs": args.calib_seqs,
                "space": args.space or "search_spaces/llama.yaml", "iterations": space.iterations,
                "generations": space.generations, "offspring": space.offspring,
                "selection": " -> ".join(f"{s.survivors}@{s.tokens}" for s in space.selection),
                **({"dtype": args.dtype} if args.dtype != "float32" else {})}
    if results.get("settings") != settings:
        results = {}
    results.update(settings=settings, environment=environment())
    results.setdefault("targets", {})
    dense, tokenizer = assets.load_model(MODEL, dtype=dtype)
    heldout = data.eval_batches(tokenizer, texts.read_text(HELD_OUT), seq_len=512, max_tokens=args.eval_tokens)
    adapter = adapter_for(dense)
    shapes, dims = adapter.shapes(dense), adapter.dims(dense)
    if "dense" not in results:
        results["dense"] = {**metrics.perplexity(dense, heldout), "decoder_params": metrics.decoder_params(dense)}
        save(name, results, table(results))

    def record(target: str, allocation: str, model, sparsity: float) -> None:
        row = results["targets"].setdefault(target, {"ppl": {}, "sparsity": {}})
        row["ppl"][allocation] = metrics.perplexity(model, heldout)["ppl"]
        row["sparsity"][allocation] = sparsity
        save(name, results, table(results))
        print(f"{target} {allocation}: ppl {row['ppl'][allocation]:.2f}", flush=True)

    for target in args.targets:
        key = str(target)
        done = results["targets"].setdefault(key, {"ppl": {}, "sparsity": {}})["ppl"]
        for allocation in ("uniform", "owl"):
            if allocation not in done:
                pruned = tyrsearch.prune(copy.deepcopy(dense), tokenizer=tokenizer, sparsity=target,
                                         allocation=allocation, calib_seqs=args.calib_seqs, dtype=args.dtype,
                                         progress=False)
                record(key, allocation, pruned.model, pruned.figures["achieved_sparsity"])
        if "searched" in done:
            continue
        out = runs / f"t{target}"
        figures = searched(out, target, args.calib_seqs, args.space, args.dtype)
        study = optuna.load_study(study_name=figures["study"]["name"], storage=f"sqlite:///{out / 'study.db'}")
        start = start_candidate(study, dense)
        record(key, "knapsack start", start, sparsity_of(adapter.shapes(start), shapes, dims))
        last = schema.iteration_record(study, schema.current_iteration(study))
        results["targets"][key]["search"] = {
            "times_s": figures["times_s"], "iterations": figures["iterations"], "trials": figures["study"]["trials"],
            "evaluation": evaluation_ratio(out, figures["study"]["name"], dense, tokenizer,
                                           generations=args.replay_generations),
            "supernet_disk_ratio": folder_bytes(Path(last.supernet)) / sum(p.numel() * p.element_size()
                                                                         for p in dense.parameters()),
            "layers": figures["layers"],
        }
        record(key, "searched", assets.load_model(str(out / "model"), dtype=dtype)[0], figures["achieved_sparsity"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--space", help="a search space file instead of the family's (e.g. a smaller quick one)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="where the searches' run folders go (default: runs/bench-search[-DTYPE])")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the precision of every model and search (bfloat16: results/search-bfloat16.json)")
    parser.add_argument("--replay-generations", type=int, default=2)
    run(parser.parse_args())


if __name__ == "__main__":
    main()

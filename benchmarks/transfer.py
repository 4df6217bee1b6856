"""Does the searched allocation's advantage survive text unlike its calibration?

Side by side, at each target, with the same local pruner (osscar) and SmolLM2-135M:
    dense
    uniform, owl          one-shot (`tyrsearch prune`, default calibration)
    knapsack start        the default search's first start candidate (per-layer sensitivities + a DP)
    searched (wave 1)     `tyrsearch search --calib c4 --space benchmarks/spaces/llama-wave1.yaml
                          --sensitivity-seqs 1` (the defaults before this benchmark)
    searched (...)        the steps between wave 1 and today's defaults, one row each (SEARCHES; ppl only,
                          at --ablation-targets)
    searched              `tyrsearch search` with today's defaults
Per row: perplexity (seq 512) on every held-out domain of `tyrsearch.texts` (none of them calibration text),
its ratio to the best one-shot row of that domain, the geometric mean of those ratios, and zero-shot
accuracy (acc_norm of ARC-Easy, PIQA, HellaSwag, WinoGrande) with standard errors.
Per search, a per-candidate table: a sample of the last iteration's complete trials spread over the fitness
ranks, each with its fitness, its KL to the dense model on every domain, and the Spearman rank correlation
of fitness with each domain's KL: where the fitness stops predicting held-out text.

Models are made by the CLI, as a user would make them, under runs/transfer/ (reused when there); figures are
saved as each finishes, so an interrupted run resumes where it stopped.

    .venv/bin/python benchmarks/transfer.py                            # 0.3 and 0.5 (hours on 2 cores)
    .venv/bin/python benchmarks/transfer.py --targets 0.5 --zero-shot 0
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
from report import ROOT, environment, load, save

from tyrsearch import assets, data, metrics, texts
from tyrsearch.allocation import sparsity_of
from tyrsearch.models import adapter_for
from tyrsearch.pruner import dims_of
from tyrsearch.search import study as schema
from tyrsearch.search.candidates import CandidateEvaluator
from tyrsearch.search.driver import params_to_levels, start_candidate
from tyrsearch.supernet import Supernet

NAME = "transfer"
MODEL = "smollm2-135m"
RUNS = ROOT / "runs" / "transfer"
TYRSEARCH = str(Path(sys.executable).with_name("tyrsearch"))
ONE_SHOT = ("uniform", "owl")
SPACES = ROOT / "benchmarks" / "spaces"
SEARCHES = {  # row name -> the search's extra CLI flags: today's defaults, wave 1, and the steps between
    "searched": [],  # today's defaults: c4,wiki, 16k fitness tokens, held-back choice, MLP channels only (>= 1/4)
    "searched (wave 1)": ["--calib", "c4", "--space", str(SPACES / "llama-wave1.yaml"), "--sensitivity-seqs", "1"],
    "searched (c4,wiki, 16k fitness, held-back)": ["--space", str(SPACES / "llama-attention-removable.yaml")],
    "searched (+ attention kept)": ["--space", str(SPACES / "llama-attention-kept.yaml")],
    "searched (+ MLP floor)": ["--space", str(SPACES / "llama-mlp-floor.yaml")],
}
DEFAULT = "searched"
WAVE1 = "searched (wave 1)"
ROWS = ("dense", *ONE_SHOT, "knapsack start", *SEARCHES)
HEADLINE = ("dense", *ONE_SHOT, "knapsack start", DEFAULT, WAVE1)  # the rows with zero-shot at every target


def folder(target: float, row: str) -> Path:
    return RUNS / f"t{target}-{re.sub(r'[^a-z0-9]+', '-', row.lower()).strip('-')}"


def cli(*args: str) -> None:
    tic = time.perf_counter()
    print("$ tyrsearch " + " ".join(args), flush=True)
    subprocess.run([TYRSEARCH, *args], check=True, stdout=subprocess.DEVNULL)
    print(f"  done in {time.perf_counter() - tic:.0f} s", flush=True)


def made(target: float, row: str, calib_seqs: int) -> Path:
    """The row's model folder, made by the CLI if it is not there yet."""
    out = folder(target, row)
    if row in ONE_SHOT:
        if not (out / "config.json").exists():
            cli("prune", "--model", MODEL, "--criterion", "osscar", "--sparsity", str(target), "--allocation", row,
                "--calib-seqs", str(calib_seqs), "--out", str(out), "--overwrite")
        return out
    if not (out / "model" / "config.json").exists():
        resume = ["--resume"] if (out / "study.db").exists() else []
        cli("search", "--model", MODEL, "--target", str(target), "--calib-seqs", str(calib_seqs), "--seed", "0",
            "--eval-tokens", "0", "--out", str(out), *resume, *SEARCHES[row])
    return out / "model"


def study_of(target: float, row: str) -> optuna.Study:
    storage = f"sqlite:///{folder(target, row) / 'study.db'}"
    return optuna.load_study(study_name=f"{MODEL}-t{target:g}", storage=storage)


def knapsack_start(dense, target: float):
    """The default search's first start candidate, cut from its cached first supernet."""
    return start_candidate(study_of(target, DEFAULT), dense)


# ---------------------------------------------------------------------------------------------------------
# Figures


def zero_shot(model, tokenizer, limit: int) -> dict:
    """acc_norm per task with its standard error, and their mean (standard error of the mean of four)."""
    tasks = {}
    for task, r in metrics.zero_shot(model, tokenizer, limit=limit, progress=False).items():
        tasks[task] = {"acc": r["acc_norm"], "se": math.sqrt(r["acc_norm"] * (1 - r["acc_norm"]) / (r["n"] - 1)),
                       "n": r["n"]}
    average = sum(t["acc"] for t in tasks.values()) / len(tasks)
    se = math.sqrt(sum(t["se"] ** 2 for t in tasks.values())) / len(tasks)
    return {"tasks": tasks, "average": average, "se": se, "limit": limit}


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def sample_trials(study: optuna.Study, count: int) -> list[optuna.trial.FrozenTrial]:
    """`count` distinct complete trials of the last iteration, evenly spread over the fitness ranks."""
    last = schema.current_iteration(study)
    complete = sorted((t for t in study.trials if schema.iteration_of(t) == last
                       and t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: (t.values[0], t.number))
    unique = list({tuple(sorted(t.params.items())): t for t in reversed(complete)}.values())[::-1]
    unique.sort(key=lambda t: (t.values[0], t.number))
    if len(unique) <= count:
        return unique
    return [unique[round(i * (len(unique) - 1) / (count - 1))] for i in range(count)]


@torch.inference_mode()
def candidate_table(dense, study: optuna.Study, domains: dict[str, torch.Tensor], calibration: dict[str, torch.Tensor],
                    count: int) -> dict:
    """Fitness against held-out KL per domain for a sample of the study's last-iteration candidates, and
    which proxy (the fitness, the held-back score, KL on each calibration corpus, their mean or maximum)
    best ranks the candidates by their mean held-out KL."""
    trials = sample_trials(study, count)
    record = schema.iteration_record(study, schema.current_iteration(study))
    supernet = Supernet.load(record.supernet)
    layers = len(supernet.grid)
    rows = [{"trial": t.number, "fitness": t.values[0], "validation": record.validation.get(str(t.number)),
             "attention_free_layers": sum(keep[0] == 0 for keep in t.user_attrs["keeps"]),
             "min_mlp_keep": min(keep[2] for keep in t.user_attrs["keeps"]), "kl": {}} for t in trials]
    for name, batches in {**domains, **calibration}.items():
        reference = metrics.dense_topk(dense, batches, k=256, progress=False)
        evaluator = CandidateEvaluator(model=dense, supernet=supernet, reference=reference)
        for row, trial in zip(rows, trials, strict=True):
            row["kl"][name] = evaluator.fitness(params_to_levels(trial.params, layers), evaluator.sequences)
    held_out = [sum(r["kl"][d] for d in domains) / len(domains) for r in rows]
    proxies = {"fitness": [r["fitness"] for r in rows],
               **{name: [r["kl"][name] for r in rows] for name in calibration},
               "mean of calibration KL": [sum(r["kl"][c] for c in calibration) / len(calibration) for r in rows],
               "max of calibration KL": [max(r["kl"][c] for c in calibration) for r in rows]}
    return {"rows": rows,
            "spearman": {name: spearman(proxies["fitness"], [r["kl"][name] for r in rows]) for name in domains},
            "proxies": {name: spearman(values, held_out) for name, values in proxies.items()}}


# ---------------------------------------------------------------------------------------------------------
# Table


def summarize(results: dict) -> None:
    """Per target: each row's ratio to the best one-shot row per domain and, once every domain is measured,
    their geometric mean."""
    domains = results["settings"]["domains"]
    for row_set in results["targets"].values():
        rows = row_set["rows"]
        for row in rows.values():
            if all(name in rows and domain in rows[name]["ppl"] for name in ONE_SHOT for domain in row["ppl"]):
                row["ratio"] = {d: ppl / min(rows[n]["ppl"][d] for n in ONE_SHOT) for d, ppl in row["ppl"].items()}
            if set(row.get("ratio", {})) == set(domains):
                row["geomean_ratio"] = math.exp(sum(map(math.log, row["ratio"].values())) / len(domains))
            else:
                row.pop("geomean_ratio", None)


def table(results: dict) -> str:
    domains = results["settings"]["domains"]
    dense = results.get("dense", {})
    lines = ["| target | allocation | sparsity | " + " | ".join(domains) + " | geo-mean ratio | zero-shot avg | "
             "search min |", "|---|---|---|" + "---|" * len(domains) + "---|---|---|"]

    def zs(row: dict) -> str:
        z = row.get("zero_shot")
        return f"{100 * z['average']:.1f} ± {100 * z['se']:.1f}" if z else "-"

    lines.append("| - | dense | 0 | " + " | ".join(f"{dense['ppl'][d]:.2f}" if d in dense.get("ppl", {}) else "-"
                                                   for d in domains) + f" | - | {zs(dense)} | - |")
    for target, row_set in sorted(results["targets"].items()):
        for name in ROWS[1:]:
            row = row_set["rows"].get(name)
            if row is None:
                continue
            cells = []
            for d in domains:
                ppl = row["ppl"].get(d)
                ratio = row.get("ratio", {}).get(d)
                cells.append("-" if ppl is None else f"{ppl:.2f}" + (f" ({ratio:.2f})" if ratio else ""))
            geo = f"{row['geomean_ratio']:.2f}" if "geomean_ratio" in row else "-"
            minutes = f"{row['search_seconds'] / 60:.1f}" if "search_seconds" in row else "-"
            lines.append(f"| {target} | {name} | {row['sparsity']:.3f} | {' | '.join(cells)} | {geo} | {zs(row)} | "
                         f"{minutes} |")
    lines += ["", "| target | search | candidates | " + " | ".join(f"ρ {d}" for d in domains) + " |",
              "|---|---|---|" + "---|" * len(domains)]
    for target, row_set in sorted(results["targets"].items()):
        for name, cand in row_set.get("candidates", {}).items():
            rho = " | ".join(f"{cand['spearman'][d]:.2f}" if d in cand["spearman"] else "-" for d in domains)
            lines.append(f"| {target} | {name} | {len(cand['rows'])} | {rho} |")
    proxy_rows = [(t, n, c) for t, rs in sorted(results["targets"].items()) for n, c in rs.get("candidates", {}).items()
                  if "proxies" in c]
    if proxy_rows:
        names = list(proxy_rows[0][2]["proxies"])
        lines += ["", "| target | search | " + " | ".join(f"ρ {p}" for p in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        lines += [f"| {t} | {n} | " + " | ".join(f"{c['proxies'][p]:.2f}" for p in names) + " |"
                  for t, n, c in proxy_rows]
    st = results["settings"]
    rows = [results.get("dense", {})] + [r for rs in results["targets"].values() for r in rs["rows"].values()]
    examples = max((r["zero_shot"]["limit"] for r in rows if "zero_shot" in r), default=0)
    lines += ["", f"SmolLM2-135M, local pruner osscar everywhere, {st['calib_seqs']} calibration sequences of 512. "
              f"Perplexity at seq 512 on the first {st['eval_tokens']} tokens of each held-out domain "
              "(`tyrsearch.texts`: none is calibration text, each deduplicated against c4 and wiki); in parentheses "
              "the ratio to the best of uniform and owl on that domain; geo-mean ratio: their geometric mean. "
              "Zero-shot: mean acc_norm of "
              f"ARC-Easy, PIQA, HellaSwag and WinoGrande ({examples} examples each; ± the standard error of "
              "the mean). ρ: Spearman rank correlation, over a sample of the search's last-iteration candidates, of "
              f"the search's fitness with the KL to the dense model on {st['candidate_tokens']} tokens of each domain. "
              "Second ρ table: how well each proxy ranks the same candidates by their mean held-out KL (c4, wiki: "
              "KL on the first tokens of each calibration corpus)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------


def evaluate_row(model, tokenizer, row: dict, domains: dict[str, torch.Tensor], zero_shot_limit: int,
                 commit) -> None:
    for name, batches in domains.items():
        if name not in row["ppl"]:
            row["ppl"][name] = metrics.perplexity(model, batches, progress=False)["ppl"]
            print(f"  {name}: ppl {row['ppl'][name]:.2f}", flush=True)
            commit()
    if zero_shot_limit and row.get("zero_shot", {}).get("limit") != zero_shot_limit:
        row["zero_shot"] = zero_shot(model, tokenizer, zero_shot_limit)
        print(f"  zero-shot {100 * row['zero_shot']['average']:.1f}", flush=True)
        commit()


def run(args) -> None:
    settings = {"eval_tokens": args.eval_tokens, "calib_seqs": args.calib_seqs, "domains": list(texts.HELD_OUT_DOMAINS),
                "candidate_tokens": args.candidate_tokens}
    results = load(NAME)
    if {k: v for k, v in results.get("settings", {}).items() if k in ("eval_tokens", "calib_seqs")} != \
            {k: settings[k] for k in ("eval_tokens", "calib_seqs")}:
        results = {}
    results.update(settings=settings, environment=environment())
    results.setdefault("targets", {})

    def commit() -> None:
        summarize(results)
        save(NAME, results, table(results))

    dense, tokenizer = assets.load_model(MODEL)
    shapes, dims = adapter_for(dense).shapes(dense), dims_of(dense)
    domains = {d: data.eval_batches(tokenizer, texts.read_text(d), seq_len=512, max_tokens=args.eval_tokens)
               for d in texts.HELD_OUT_DOMAINS}
    calibration = {c: data.eval_batches(tokenizer, texts.read_text(c), seq_len=512, max_tokens=args.candidate_tokens)
                   for c in ("c4", "wiki")}  # the first tokens of each; the searches' fitness draws random windows
    print("dense", flush=True)
    results.setdefault("dense", {"ppl": {}})
    evaluate_row(dense, tokenizer, results["dense"], domains, 0, commit)
    for target in args.targets:
        row_set = results["targets"].setdefault(str(target), {"rows": {}})
        for name in ROWS[1:]:
            if (name not in HEADLINE and target not in args.ablation_targets) or name not in args.rows:
                continue
            row = row_set["rows"].setdefault(name, {"ppl": {}})
            if set(row["ppl"]) == set(domains) and "sparsity" in row:
                continue  # measured; its model is made again only if a later step needs it
            print(f"{target} {name}", flush=True)
            if name == "knapsack start":
                made(target, DEFAULT, args.calib_seqs)
                model = knapsack_start(dense, target)
            else:
                path = made(target, name, args.calib_seqs)
                model, _ = assets.load_model(str(path))
            if name in SEARCHES:
                times = json.loads((folder(target, name) / "result.json").read_text())["times_s"]
                row["search_seconds"] = times["supernet"] + times["sensitivity"] + times["search"]
            pruned = adapter_for(model).shapes(model)
            row["sparsity"] = sparsity_of(pruned, shapes, dims)
            row["shape"] = {"attention_free": sum(s.q_heads == 0 for s in pruned),
                            "min_mlp": min(s.intermediate for s in pruned)}
            evaluate_row(model, tokenizer, row, domains, 0, commit)
    for target in args.targets if args.zero_shot else ():  # before the candidate tables: the headline metric
        row_set = results["targets"][str(target)]
        for name in (n for n in HEADLINE if n in args.rows):
            row = results["dense"] if name == "dense" else row_set["rows"][name]
            if row.get("zero_shot", {}).get("limit") == args.zero_shot:
                continue
            print(f"{target} {name}: zero-shot", flush=True)
            if name == "dense":
                model = dense
            elif name == "knapsack start":
                made(target, DEFAULT, args.calib_seqs)  # its study and supernet (a fresh checkout has neither)
                model = knapsack_start(dense, target)
            else:
                model = assets.load_model(str(made(target, name, args.calib_seqs)))[0]
            evaluate_row(model, tokenizer, row, {}, args.zero_shot, commit)
    for target in args.targets if args.candidates else ():
        row_set = results["targets"][str(target)]
        sample = {d: b[: -(-args.candidate_tokens // 512)] for d, b in domains.items()}
        for name in (n for n in (DEFAULT, WAVE1) if n in args.rows):  # the steps between cost as much again
            known = row_set.setdefault("candidates", {}).get(name)
            if known is None or set(known["spearman"]) != set(sample) or "proxies" not in known:
                print(f"{target} {name}: candidate table", flush=True)
                row_set["candidates"][name] = candidate_table(dense, study_of(target, name), sample, calibration,
                                                              args.candidates)
                commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--ablation-targets", type=float, nargs="*", default=[0.5],
                        help="targets that also get the rows between wave 1 and today's defaults")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), metavar="ROW",
                        help="only these rows (default: all); e.g. dense uniform owl 'knapsack start' searched")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain")
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--zero-shot", type=int, default=500, help="examples per zero-shot task (0: skip)")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per search in the table (0: skip)")
    parser.add_argument("--candidate-tokens", type=int, default=4096, help="tokens per domain per candidate")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

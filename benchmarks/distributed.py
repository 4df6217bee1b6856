"""The same search on SmolLM2 run by different runners, side by side, and a fault test.

Runs (one after another, same seed, same cached supernet): the local runner; the `optuna` runner with 1
and with 2 worker processes on PostgreSQL; the `ray` runner (a local Ray cluster it starts, study in
SQLite) with 1 and 2 Tune trials at once. Each worker has 1 torch thread (Ray: 1 CPU), so 2 workers use
the 2 cores. For each: wall time of the whole command, the candidate phase (first trial start to last
trial end), trials per minute in that phase, and the winner. Parallel efficiency = (1-worker phase
time) / (2 x 2-worker phase time), per runner. Then the fault test: a search with --workers 0 and two `tyrsearch worker`
processes; once some trials have finished, one worker and the search process are killed with SIGKILL;
the search is resumed with --resume and a new worker; figures: trials finished before the kill, after
the resume, finished trials lost (goal 0), trials retried, and whether the winner equals the
uninterrupted one.

    .venv/bin/python benchmarks/distributed.py              # about 20 minutes on 2 cores
    .venv/bin/python benchmarks/distributed.py --only ray   # rerun one runner's rows, keep the rest
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState
from report import ROOT, environment, load, save

NAME = "distributed"
RUNS = ROOT / "runs" / "bench-distributed"
PG = os.environ.get("TYRSEARCH_BENCH_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
SPACE = """family: llama
units:
  q_heads: {min_keep: 0, step: 1}
  mlp: {min_keep: 0, step: 128}
levels: 4
iterations: 1
generations: %(generations)d
offspring: 8
selection:
  - {survivors: 8, tokens: 512}
  - {survivors: 2, tokens: 1024}
  - {survivors: 1, tokens: 2048}
fitness: {metric: kl, top_k: 256}
"""


def search_args(out: Path, space: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tyrsearch.cli", "search", "--model", "smollm2-135m", "--target", "0.3",
            "--space", str(space), "--calib-seqs", "8", "--start", "centre", "--out", str(out),
            "--supernet-dir", str(RUNS / "supernets"), "--json", *extra]


def worker_args(study: str) -> list[str]:
    return [sys.executable, "-m", "tyrsearch.cli", "worker", "--storage", PG, "--study", study, "--threads", "1",
            "--heartbeat", "2", "--quiet"]


def phase(study: optuna.Study) -> dict:
    """The candidate phase: first trial start to last trial end, and what finished in it."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    seconds = (end - start).total_seconds()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    busy = sum(t.user_attrs.get("seconds", 0.0) for t in trials)  # spent inside candidate evaluation
    return {"phase_s": seconds, "trials": len(done), "trials_per_min": 60 * len(done) / seconds, "busy_s": busy}


def run(label: str, args: list[str], storage: str, study: str) -> dict:
    tic = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    row = {"runner": label, "wall_s": time.perf_counter() - tic, "fitness": result["fitness"]["value"],
           "layers": result["layers"], **phase(optuna.load_study(study_name=study, storage=storage))}
    print(f"{label}: {row['trials']} trials in {row['phase_s']:.1f} s ({row['trials_per_min']:.1f}/min), "
          f"wall {row['wall_s']:.0f} s, fitness {row['fitness']:.5f}", flush=True)
    return row


def fault_test(space: Path, reference: dict) -> dict:
    study = f"bench-fault-{uuid.uuid4().hex[:8]}"
    out = RUNS / "fault"
    args = search_args(out, space, "--runner", "optuna", "--storage", PG, "--study", study, "--workers", "0",
                       "--heartbeat", "2")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    driver = subprocess.Popen(args, **quiet)
    workers = [subprocess.Popen(worker_args(study), **quiet) for _ in range(2)]
    storage = optuna.storages.RDBStorage(PG)
    while True:  # until a third of the trials have finished
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
        except KeyError:
            continue
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if len(finished) >= reference["trials"] // 3 and any(t.state == TrialState.RUNNING for t in trials):
            break
    for process in (workers[0], driver):
        process.send_signal(signal.SIGKILL)
        process.wait()
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    before = {t.number: t.state for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env)
    if resumed.returncode != 0:
        raise SystemExit(f"resume failed:\n{resumed.stderr[-3000:]}")
    for worker in workers[1:]:
        worker.wait()
    final = optuna.load_study(study_name=study, storage=storage)
    after = {t.number: t.state for t in final.get_trials(deepcopy=False)}
    lost = [n for n, state in before.items() if after[n] != state]
    retried = [t for t in final.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") is not None]
    optuna.delete_study(study_name=study, storage=storage)
    return {"finished_before_kill": len(before), "running_at_kill": len(running),
            "finished_after_resume": sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in after.values()),
            "lost": len(lost), "retried": len(retried),
            "same_winner": json.loads(resumed.stdout)["layers"] == reference["layers"]}


def table(results: dict) -> str:
    lines = ["| runner | workers x threads | trials | candidate phase s | trials / min | evaluating s | "
             "busy fraction | whole command s | fitness |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        lines.append(f"| {row['runner']} | {row['workers']} | {row['trials']} | {row['phase_s']:.1f} | "
                     f"{row['trials_per_min']:.1f} | {row['busy_s']:.1f} | {row['utilization']:.2f} | "
                     f"{row['wall_s']:.0f} | {row['fitness']:.5f} |")
    fault = results["fault"]
    return "\n".join(lines) + (
        "\n\nEvaluating s: time spent inside candidate evaluation, summed over workers; busy fraction: that over "
        "workers x candidate phase (the rest is waiting for the generation's other candidates, polling and "
        "the database)."
        f" Parallel efficiency with 2 workers (goal 0.8): optuna {results['parallel_efficiency']['optuna']:.2f}, "
        f"ray {results['parallel_efficiency']['ray']:.2f}; "
        f"same winner with every runner: {results['same_winner']}. Fault test (SIGKILL of one of two workers "
        f"and of the search process, then `--resume` and a new worker): {fault['finished_before_kill']} trials "
        f"finished before the kill ({fault['running_at_kill']} running), {fault['finished_after_resume']} after "
        f"the resume, {fault['lost']} lost, {fault['retried']} retried, same winner as uninterrupted: "
        f"{fault['same_winner']}. SmolLM2 at 0.3, 1 iteration of {results['settings']['generations']} "
        "generations x 8 offspring (selection 8@512 -> 2@1024 -> 1@2048 tokens); the optuna runner's study in "
        "PostgreSQL, the local and ray runners' in SQLite.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--only", choices=("local", "optuna", "ray"), default=None,
                        help="rerun this runner's rows only, keeping the other rows and the fault test")
    args = parser.parse_args()
    kept = load(NAME) if args.only else {}
    RUNS.mkdir(parents=True, exist_ok=True)
    space = RUNS / "space.yaml"
    space.write_text(SPACE % {"generations": args.generations})
    rows = []
    for label, processes in (("local", 1), ("optuna", 1), ("optuna", 2), ("ray", 1), ("ray", 2)):
        if args.only and label != args.only:
            rows.append(next(r for r in kept["runs"] if r["runner"] == label and
                             r["workers"] == ("1 x 2" if label == "local" else f"{processes} x 1")))
            continue
        workers = "1 x 2" if label == "local" else f"{processes} x 1"
        out = RUNS / f"{label}-{workers.replace(' ', '')}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        extra = ["--runner", label, "--workers", str(processes), "--worker-threads", "1"]
        if label == "optuna":
            storage, study = PG, f"bench-{uuid.uuid4().hex[:8]}"
            row = run(label, search_args(out, space, *extra, "--storage", PG, "--study", study, "--heartbeat", "2"),
                      storage, study)
            optuna.delete_study(study_name=study, storage=storage)
        else:
            storage, study = f"sqlite:///{out / 'study.db'}", "bench"
            row = run(label, search_args(out, space, "--study", study, *extra[:2 if label == "local" else None]),
                      storage, study)
        rows.append({**row, "workers": workers, "utilization": row["busy_s"] / (processes * row["phase_s"])})
    phases = {(r["runner"], r["workers"]): r["phase_s"] for r in rows}
    results = {"settings": {"generations": args.generations, "model": "smollm2-135m", "target": 0.3},
               "environment": environment(), "runs": rows,
               "parallel_efficiency": {name: phases[(name, "1 x 1")] / (2 * phases[(name, "2 x 1")])
                                       for name in ("optuna", "ray")},
               "same_winner": all(r["layers"] == rows[0]["layers"] for r in rows)}
    if args.only:
        results["fault"] = kept["fault"]
    else:
        subprocess.run(["rm", "-rf", str(RUNS / "fault")], check=True)
        results["fault"] = fault_test(space, rows[0])
    print(json.dumps(results["fault"]), flush=True)
    save(NAME, results, table(results))


if __name__ == "__main__":
    main()

"""Optuna workers: processes that share one study through an RDB storage (PostgreSQL across machines).

The search process plans generations and waits; `serve` (the `tyrsearch worker` command) claims and
evaluates planned candidates until the search is done. Each worker loads the model and computes the
dense reference once, and each iteration's supernet once, from the folder the study names (a path that
every worker can read). `OptunaRunner` spawns N local workers; with 0 it waits for workers started by
hand, on this machine or others.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import torch
from tqdm.auto import tqdm

from tyrsearch.errors import UserError
from tyrsearch.placement import placement
from tyrsearch.runners.base import Runner
from tyrsearch.search import study as schema
from tyrsearch.search.driver import Search, Winner, join_study
from tyrsearch.search.job import Job
from tyrsearch.search.storage import HEARTBEAT_S, is_sqlite, open_storage
from tyrsearch.search.worker import Backoff, Worker, reference_for


class OptunaRunner(Runner):
    def __init__(self, *, storage_url: str, study_name: str, workers: int, threads: int | None = None,
                 heartbeat_s: float = HEARTBEAT_S, device: str = "auto"):
        if is_sqlite(storage_url) and workers != 1:
            raise UserError("SQLite cannot be shared by parallel workers: pass --storage postgresql://... "
                            "(or --workers 1)")
        self.storage_url, self.study_name, self.workers = storage_url, study_name, workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
        self.heartbeat_s = heartbeat_s
        self.gpus = torch.cuda.device_count() if placement(device).device.type == "cuda" else 0

    def run(self, search: Search) -> Winner:
        workers = [self._spawn(index) for index in range(self.workers)]
        try:
            result = search.run(work=lambda: self._check(workers))
        except BaseException:
            for worker in workers:
                worker.terminate()
            raise
        for worker in workers:
            worker.wait()
        return result

    def _spawn(self, index: int) -> subprocess.Popen:
        """Worker `index`: on a GPU machine it sees one GPU (round robin), else it runs on the CPU."""
        command = [sys.executable, "-m", "tyrsearch.cli", "worker", "--study", self.study_name,
                   "--threads", str(self.threads), "--heartbeat", str(self.heartbeat_s), "--quiet",
                   "--device", "cuda" if self.gpus else "cpu"]
        # the URL goes by environment, not argv, so that its password is not on every `ps` listing
        env = {**os.environ, "OPTUNA_STORAGE": self.storage_url,
               **({"CUDA_VISIBLE_DEVICES": str(index % self.gpus)} if self.gpus else {})}
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)  # errors go to stderr

    @staticmethod
    def _check(workers: list[subprocess.Popen]) -> bool:
        """Nothing to evaluate here; only fail when every spawned worker has died (the search would wait
        forever). One dead worker is survivable: its trials are retried by the others."""
        codes = [w.poll() for w in workers]
        if workers and all(code not in (None, 0) for code in codes):
            raise RuntimeError(f"every worker exited (status {', '.join(map(str, codes))}); see their output above")
        return False


def serve(*, storage_url: str, study_name: str, heartbeat_s: float = HEARTBEAT_S, threads: int | None = None,
          wait_s: float = 60.0, device: str = "auto", progress: bool = True) -> dict:
    """Evaluate the study's planned candidates on `device` (in the search's dtype) until its search is done;
    returns what this worker did. Waits up to `wait_s` for the search to create the study."""
    placement(device)  # an unavailable GPU fails before the wait
    if threads:
        torch.set_num_threads(threads)
    storage = open_storage(storage_url, heartbeat_s=heartbeat_s)
    deadline = time.monotonic() + wait_s
    while True:  # a worker may start before the search has created its study
        try:
            study, space = join_study(storage=storage, study_name=study_name)
            if schema.job(study) is not None:
                break
        except UserError:
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise UserError(f"study {study_name!r} has no job to work on: it was not started by `tyrsearch search`")
        time.sleep(0.5)
    job = Job(**schema.job(study))
    model, _, batches = job.load(space, device=device)
    reference = reference_for(model, batches.fitness, space, batch_size=job.batch_size)
    worker = Worker(study=study, model=model, reference=reference, space=space, batch_size=job.batch_size)
    tic, stages, backoff = time.perf_counter(), 0, Backoff()
    with tqdm(desc=f"worker on {study_name}", unit="stage", disable=not progress) as bar:
        try:
            while not schema.is_done(study):
                if worker.step():
                    stages += 1
                    bar.update()
                    backoff.reset()
                else:
                    optuna.storages.fail_stale_trials(study)  # another worker died: its trials come back
                    backoff.idle()
        finally:
            worker.close()
    return {"study": study_name, "stages_evaluated": stages, "seconds": time.perf_counter() - tic}

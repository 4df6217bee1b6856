"""Ray: the search's candidates evaluated by Ray Tune trials on a Ray cluster (an existing one with
`address`, else a local one started and stopped here).

This process plans generations (the search, in a thread) and runs one `Tuner` whose search algorithm is
`StudySearch`, Ray's OptunaSearch over the search's own study and sampler. A Tune trial is one selection
stage of one planned candidate: its config is a `Task` handed out by the study-side `Dispatcher`, and
its result goes back to the same Optuna trial, so the multi-step selection stays Optuna pruning (the
study's SelectionPruner at each generation's stage barrier). The evaluating is done by `--workers`
long-lived `Evaluator` actors, each holding the model, the dense reference and every supernet it has
loaded (a Ray worker holds a supernet once, not once per trial; Tune's own trial actors come and go
between generations, so they only hand their stage to an idle Evaluator through a Ray queue). Only this
process talks to the study, so the default SQLite storage works. Faults: Ray restarts a dead Evaluator
and Tune reruns its trial (`MAX_FAILURES`); a killed search resumes with --resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict

import optuna
import ray
from ray import cloudpickle, tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.util.queue import Queue

from tyrsearch.errors import UserError
from tyrsearch.runners import ray_trial
from tyrsearch.runners.base import Runner
from tyrsearch.search import study as schema
from tyrsearch.search.driver import Search, Winner
from tyrsearch.search.job import Job
from tyrsearch.search.worker import Backoff, Dispatcher, EvaluationModels, Task, reference_for, worker_name
from tyrsearch.space import parse_space

cloudpickle.register_pickle_by_value(ray_trial)  # trial actors then never import tyrsearch (torch)

METRIC = "fitness"
IDLE_WAIT_S = 1.0  # how long a suggestion may wait for the next generation's plan when no trial runs
MAX_FAILURES = 2  # Ray restarts a dead Evaluator, and Tune reruns a failed trial, this many times


class StudySearch(OptunaSearch):
    """OptunaSearch over an existing study whose trials the search plans: a suggestion is the next ready
    Task (claimed from the study, not asked of the sampler), a result is reported to its Optuna trial."""

    def __init__(self, *, study: optuna.Study, dispatcher: Dispatcher, finished: threading.Event):
        super().__init__(metric=METRIC, mode="min", sampler=study.sampler, storage=study._storage,
                         study_name=study.study_name)
        self._ot_study, self.dispatcher, self.finished = study, dispatcher, finished
        self.tasks: dict[str, Task] = {}  # Tune trial id -> the stage it evaluates
        self.workers: dict[str, dict] = {}  # per Ray worker: stages evaluated, supernets loaded
        self.error: str | None = None

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return True  # the study is the search space; metric and mode are fixed

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.finished.is_set() or self.error:
            return Searcher.FINISHED
        task = self.dispatcher.next()
        deadline, backoff = time.monotonic() + IDLE_WAIT_S, Backoff()
        while task is None and not self.tasks and time.monotonic() < deadline and not self.finished.is_set():
            backoff.idle()  # nothing runs: wait here for the next plan rather than in Tune's 1 s idle sleep
            task = self.dispatcher.next()
        if task is None:
            return None  # Tune asks again shortly
        self.tasks[trial_id] = task
        return {"task": asdict(task)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # one result per trial: recorded on completion

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        task = self.tasks.pop(trial_id)
        if error or not result or METRIC not in result:
            self.error = f"candidate trial {task.trial_id} failed on Ray {MAX_FAILURES + 1} times"
            self.dispatcher.abandon(task)
            return
        self.dispatcher.record(task, result[METRIC], result["seconds"], worker=result["worker"])
        stats = self.workers.setdefault(result["worker"], {"stages": 0, "supernet_loads": 0})
        stats["stages"] += 1
        stats["supernet_loads"] = result["supernet_loads"]

    def save_to_dir(self, *args, **kwargs) -> None:
        pass  # the study is the state: a rerun with --resume continues it

    def __getstate__(self) -> dict:
        """Tune pickles its search algorithm for Tuner.restore, which a search never uses (--resume
        continues the study): the live study, dispatcher and event stay out."""
        return {key: value for key, value in self.__dict__.items()
                if key not in ("_ot_study", "_storage", "dispatcher", "finished")}


@ray.remote
class Evaluator:
    """A Ray worker that evaluates: it loads the model, the dense reference and each supernet once and
    keeps them for the whole search (Tune's own trial actors come and go between generations)."""

    def __init__(self, job: dict, space: dict, threads: int):
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        space = parse_space(space, source="the search")
        job = Job(**job)
        model, _, batches = job.load(space)
        reference = reference_for(model, batches.fitness, space, batch_size=job.batch_size)
        self.evaluation = EvaluationModels(model=model, reference=reference, space=space, batch_size=job.batch_size)

    def evaluate(self, task: dict) -> dict:
        tic = time.perf_counter()
        value = self.evaluation(Task(**task))
        return {METRIC: value, "seconds": time.perf_counter() - tic, "supernet_loads": self.evaluation.loads,
                "worker": worker_name()}


class RayRunner(Runner):
    def __init__(self, *, address: str | None, workers: int, threads: int | None = None):
        if workers < 1:
            raise UserError("the ray runner needs --workers 1 or more (Tune trials run at most that many at once)")
        if address:
            check_reachable(address)  # ray.init would retry an unreachable cluster for minutes
        self.address, self.workers = address, workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)

    def run(self, search: Search) -> Winner:
        with ray_cluster(self.address, cpus=self.workers * self.threads):
            return self._run(search)

    def _run(self, search: Search) -> Winner:
        study = search.study
        search.retry_running()  # left by a killed earlier run of this search
        dispatcher = Dispatcher(study=study, space=search.space, seq_len=search.seq_len)
        finished, stop = threading.Event(), threading.Event()
        outcome: dict = {}

        def plan() -> None:  # the search plans in a thread; Tune's loop needs the main one
            def work() -> bool:
                if stop.is_set():
                    raise KeyboardInterrupt("the Ray run stopped")
                return False

            try:
                outcome["result"] = search.run(work=work)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = error
            finally:
                finished.set()

        # the CPUs are reserved by the Tune trial that has an Evaluator busy, not by the idle Evaluator; the
        # handles stay referenced here for the whole run (a handle only in the queue lets Ray collect it)
        # one GPU per Evaluator where the cluster has them (Ray sets each actor's CUDA_VISIBLE_DEVICES)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        pool = [Evaluator.options(num_cpus=0, num_gpus=gpus, max_restarts=MAX_FAILURES,
                                  max_task_retries=MAX_FAILURES).remote(
            schema.job(study), schema.settings(study)["space"], self.threads) for _ in range(self.workers)]
        evaluators = Queue()
        for evaluator in pool:
            evaluators.put(evaluator)
        searcher = StudySearch(study=study, dispatcher=dispatcher, finished=finished)
        planner = threading.Thread(target=plan, name="tyrsearch-plan", daemon=True)
        planner.start()
        try:
            # Tune prints its tables on stdout, which carries --json: they go to stderr
            with tempfile.TemporaryDirectory(prefix="tyrsearch-tune-") as results, \
                    contextlib.redirect_stdout(sys.stderr):
                tuner = tune.Tuner(
                    tune.with_resources(tune.with_parameters(ray_trial.evaluate_stage, evaluators=evaluators),
                                        {"cpu": self.threads}),
                    tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, reuse_actors=True,
                                                max_concurrent_trials=self.workers,
                                                trial_name_creator=_stage_name, trial_dirname_creator=_stage_name),
                    run_config=tune.RunConfig(name="tyrsearch", storage_path=results, verbose=0,
                                              failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)))
                tuner.fit()
        finally:
            stop.set()
            planner.join()
            dispatcher.close()
        if searcher.error:
            raise RuntimeError(f"{searcher.error}; see the Ray output above")
        if "error" in outcome:
            raise outcome["error"]
        outcome["result"].workers = searcher.workers
        return outcome["result"]


def _stage_name(trial: tune.experiment.Trial) -> str:
    task = trial.config["task"]
    return f"trial{task['trial_id']}-stage{task['stage']}"


def check_reachable(address: str) -> None:
    """Refuse at once a HOST:PORT (or ray://HOST:PORT) cluster address that nothing answers on."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        if address == "auto":
            return  # Ray finds this machine's cluster itself (or fails at once)
        raise UserError(f"--address {address!r} is not HOST:PORT (the cluster's GCS address, e.g. 127.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError(f"cannot reach the Ray cluster at {address} ({error.strerror or error}); start it with "
                        "`ray start --head` or pass the right --address") from None


@contextlib.contextmanager
def ray_cluster(address: str | None, *, cpus: int) -> Iterator[None]:
    """Connected to the Ray cluster at `address`, or to a local one with `cpus` CPUs started in a temp dir;
    disconnected (and the local one stopped) afterwards."""
    options = {"logging_level": logging.WARNING}
    temp = None if address else tempfile.mkdtemp(prefix="tyrsearch-ray-")
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp, **options)
    except ConnectionError as error:
        raise UserError(f"cannot reach the Ray cluster at {address}: {error}; start it with `ray start --head` "
                        "or pass the right --address") from None
    try:
        yield
    finally:
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)

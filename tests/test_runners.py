"""Runners on the real PostgreSQL: Optuna workers in separate processes share one study, evaluate every
planned candidate exactly once, find the local runner's winner, and survive SIGKILL of a worker and of
the search process. Also: storage errors, the dashboard server and the report of a study."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import RUNNER_SPACE, SEARCH_SPACE, check_every_place_once, run_cli, search_args, space_file
from tyrsearch.search import study as schema
from tyrsearch.search.selection import SelectionPruner
from tyrsearch.search.storage import open_storage
from tyrsearch.search.study import GENERATION, INDEX, ITERATION
from tyrsearch.search.worker import Dispatcher, Heartbeat, claim, retry


@pytest.fixture
def space(tmp_path):
    return space_file(tmp_path, RUNNER_SPACE)


@pytest.fixture
def study_name(postgres_url):
    """A fresh study name on the shared PostgreSQL database, deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=postgres_url)


def _args(tiny_folder, text_file, space, out, *extra):
    return search_args(tiny_folder, text_file, space, out, "--json", *extra)


def _spawn(*args: str, log) -> subprocess.Popen:
    """The CLI in its own process; stdout and stderr to files (a full pipe would stall it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "tyrsearch.cli", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"))  # noqa: SIM115


def _read(logs, name: str) -> str:
    return Path(f"{logs}-{name}").read_text()


@pytest.mark.postgres
def test_two_optuna_workers_on_postgres_find_the_local_winner(postgres_url, tiny_folder, text_file, space,
                                                              study_name,
                                                              tmp_path):
    local = run_cli(*_args(tiny_folder, text_file, space, tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    shared = run_cli(*_args(tiny_folder, text_file, space, tmp_path / "shared", "--runner", "optuna", "--workers", "2",
                            "--storage", postgres_url, "--study", study_name))
    assert shared.returncode == 0, shared.stderr
    ours, theirs = json.loads(local.stdout), json.loads(shared.stdout)
    assert theirs["layers"] == ours["layers"]
    assert theirs["fitness"]["value"] == pytest.approx(ours["fitness"]["value"], rel=1e-4)
    assert theirs["study"]["trials"] == ours["study"]["trials"]  # same plan, nothing evaluated twice
    assert theirs["study"]["storage"].startswith("postgresql") and theirs["config"]["workers"] == 2
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    check_every_place_once(study.trials)
    assert all(t.user_attrs["tokens"] > 0 and "keeps" in t.user_attrs for t in study.trials)
    report = run_cli("report", "--storage", postgres_url, "--study", study_name, "--out", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") == 3 and "still running" not in page and f"{ours['achieved_sparsity']:.4f}" in page


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.postgres
def test_sigkill_of_a_worker_and_of_the_search_then_resume_loses_nothing(postgres_url, tiny_folder, text_file, space,
                                                                         study_name, tmp_path):
    reference = run_cli(*_args(tiny_folder, text_file, space, tmp_path / "local"))
    assert reference.returncode == 0, reference.stderr
    args = _args(tiny_folder, text_file, space, tmp_path / "run", "--runner", "optuna", "--storage", postgres_url,
                 "--study", study_name, "--heartbeat", "1")
    logs = tmp_path / "logs"
    driver = _spawn(*args, "--workers", "0", log=f"{logs}-driver")
    worker = _spawn("worker", "--storage", postgres_url, "--study", study_name, "--heartbeat", "1", "--quiet",
                    log=f"{logs}-worker")
    storage = optuna.storages.RDBStorage(postgres_url)

    def frozen_mid_search():
        """Stop the worker; keep it stopped if it holds running trials and others have finished."""
        if worker.poll() is not None or driver.poll() is not None:
            raise AssertionError("exited early: " + _read(logs, "worker.err") + _read(logs, "driver.err"))
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            return None
        os.kill(worker.pid, signal.SIGSTOP)
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if running and len(finished) >= 3:
            return running, finished
        os.kill(worker.pid, signal.SIGCONT)
        return None

    running, finished = _wait_for(frozen_mid_search, 120, "a worker holding trials mid-search")
    for process in (worker, driver):
        process.kill()  # SIGKILL: no cleanup of any kind
        process.wait()
    partial = run_cli("report", "--storage", postgres_url, "--study", study_name, "--out",
                      str(tmp_path / "partial.html"))
    if partial.returncode == 0:  # the report of a running study: the best so far
        assert "still running" in (tmp_path / "partial.html").read_text()
    else:
        assert "no complete candidate yet" in partial.stderr
    resumed = _spawn(*args, "--workers", "0", "--resume", log=f"{logs}-resumed")
    rescuer = _spawn("worker", "--storage", postgres_url, "--study", study_name, "--heartbeat", "1", "--quiet",
                     log=f"{logs}-rescuer")
    assert resumed.wait(timeout=300) == 0, _read(logs, "resumed.err")
    assert rescuer.wait(timeout=60) == 0, _read(logs, "rescuer.err")
    out = _read(logs, "resumed.out")
    assert json.loads(out)["layers"] == json.loads(reference.stdout)["layers"]  # the uninterrupted winner
    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    by_number = {t.number: t for t in study.trials}
    assert all(by_number[t.number].state == t.state for t in finished)  # nothing finished was lost
    for trial in running:  # failed by the heartbeat and retried with the same candidate in the same place
        assert by_number[trial.number].state == TrialState.FAIL
        place = (trial.system_attrs[ITERATION], trial.system_attrs[GENERATION], trial.system_attrs[INDEX])
        retried = [t for t in study.trials if t.system_attrs.get("failed_trial") is not None
                   and (t.system_attrs[ITERATION], t.system_attrs[GENERATION], t.system_attrs[INDEX]) == place]
        assert retried and retried[-1].state in (TrialState.COMPLETE, TrialState.PRUNED)
    check_every_place_once(study.trials)


@pytest.mark.postgres
@pytest.mark.parametrize("url", ["postgresql://postgres:s3cret@127.0.0.1:1/test",
                                 "postgresql://postgres:s3cret@127.0.0.1:5432/no_such_database"])
def test_storage_trouble_is_one_line_exit_2_without_the_password(url, tiny_folder, text_file, space,
                                                                 tmp_path):
    for args in (_args(tiny_folder, text_file, space, tmp_path / "o", "--runner", "optuna", "--storage", url),
                 ["worker", "--storage", url, "--study", "x"], ["report", "--storage", url, "--study", "x",
                                                                  "--out", str(tmp_path / "r.html")]):
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot open the study storage" in lines[0] and "s3cret" not in lines[0]
        assert "***" in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.html").exists()


@pytest.mark.postgres
def test_workers_refuse_sqlite_and_unknown_studies(postgres_url, tiny_folder, text_file, space, study_name,
                                                   tmp_path):
    sqlite = run_cli(*_args(tiny_folder, text_file, space, tmp_path / "o", "--runner", "optuna", "--workers", "2"))
    assert sqlite.returncode == 2 and "SQLite cannot be shared by parallel workers" in sqlite.stderr
    missing = run_cli("worker", "--storage", postgres_url, "--study", study_name, "--wait", "0")
    assert missing.returncode == 2 and f"no study {study_name!r}" in missing.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_storage_on_localhost(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="smollm2-135m-t0.3", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1),
                                                                             n_trials=2)
    port = _free_port()
    server = _spawn("dashboard", "--storage", url, "--port", str(port), log=tmp_path / "dashboard")
    try:
        def studies():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    return json.loads(response.read())
            except OSError:
                return None

        listed = _wait_for(studies, 60, "the dashboard to answer")
        assert [s["study_name"] for s in listed["study_summaries"]] == ["smollm2-135m-t0.3"]
        assert _listening_on(port) == {"127.0.0.1"}  # not reachable from other machines
    finally:
        server.terminate()
        server.wait(timeout=30)


def _listening_on(port: int) -> set[str]:
    """Addresses with a listening TCP socket on `port` (Linux /proc/net/tcp: hex little-endian IPv4)."""
    found = set()
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.postgres
def test_a_worker_killed_as_it_claims_leaves_a_trial_that_goes_stale_and_is_retried(postgres_url, study_name):
    """The heartbeat starts before the claim: a RUNNING trial without a heartbeat is never failed by Optuna,
    and the search would wait for it forever."""
    storage = open_storage(postgres_url, heartbeat_s=1)
    study = optuna.create_study(study_name=study_name, storage=storage)
    for index in range(2):
        schema.add_planned_trial(study, schema.Place(0, 0, index))
        schema.set_planned_params(study, study.trials[index], {"0.mlp": index})
    heartbeat = Heartbeat(storage, 1)
    other = Heartbeat(storage, 1)
    held = claim(study, 0, heartbeat=heartbeat)
    assert held is not None and heartbeat.ids == {schema.trial_id(held)}
    assert claim(study, 0, heartbeat=other).number != held.number and len(other.ids) == 1  # one each
    assert claim(study, 0, heartbeat=other) is None and len(other.ids) == 1  # a lost claim beats for nothing
    heartbeat.close()  # the worker dies holding the trial
    _wait_for(lambda: optuna.storages.fail_stale_trials(study) or
              study.trials[held.number].state == TrialState.FAIL or None, 30, "the held trial to go stale")
    other.close()
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == held.number]
    assert len(retried) == 1 and retried[0].state == TrialState.WAITING
    assert schema.planned_params(retried[0]) == schema.planned_params(held)  # the same candidate, claimable


def _planned_study(iterations: int) -> optuna.Study:
    """An in-memory study with iterations 0..iterations-1 recorded (supernet folders net0, net1, ...), the
    last current, and one planned candidate in it."""
    study = optuna.create_study(pruner=SelectionPruner(survivors=[s.survivors for s in SEARCH_SPACE.selection]))
    for k in range(iterations):
        schema.start_iteration(study, k, schema.IterationRecord(grid=[{"mlp": [8, 4, 0]}], levels=1, start={},
                                                                steps={"mlp": 4}, cost={}, supernet=f"net{k}"))
    schema.add_planned_trial(study, schema.Place(iterations - 1, 0, 0))
    schema.set_planned_params(study, study.trials[0], {"L00.mlp": 0})
    return study


def test_a_held_trial_is_evaluated_on_its_own_iterations_supernet_while_a_resumed_search_walks_back():
    """A resumed search makes its finished iterations current again on its way to the last one; a worker
    holding a trial of the last must not evaluate its next stage on an earlier iteration's supernet."""
    study = _planned_study(2)
    dispatcher = Dispatcher(study=study, space=SEARCH_SPACE, seq_len=24)
    first = dispatcher.next()
    assert (first.iteration, first.stage, first.supernet) == (1, 0, "net1")
    dispatcher.record(first, 0.5, 0.1, worker="here")
    schema.start_iteration(study, 0, schema.iteration_record(study, 0))  # the resumed search passes iteration 0
    second = dispatcher.next()
    assert (second.iteration, second.stage, second.supernet) == (1, 1, "net1")


def test_the_copy_of_a_trial_that_reported_its_last_stage_completes_with_that_value():
    """A worker that dies between reporting the last stage and completing the trial: the retried copy
    inherits every stage's value, so the next worker completes it without evaluating anything."""
    study = _planned_study(1)
    dying = Dispatcher(study=study, space=SEARCH_SPACE, seq_len=24)
    for stage, value in enumerate((0.3, 0.2)):
        task = dying.next()
        assert task.stage == stage
        dying.record(task, value, 0.1, worker="dying")
    optuna.Trial(study, schema.trial_id(study.trials[0])).report(0.25, len(SEARCH_SPACE.selection) - 1)
    retry(study, study.trials[0])  # what the heartbeat does once the worker is dead
    assert Dispatcher(study=study, space=SEARCH_SPACE, seq_len=24).next() is None  # nothing to evaluate
    original, copy = study.trials
    assert original.state == TrialState.FAIL and copy.state == TrialState.COMPLETE and copy.value == 0.25

"""The ray runner and Ray Jobs on a real local Ray cluster: Tune trials evaluate a small search and find
the local runner's winner, each Ray worker loads each supernet once, a search submitted with
`tyrsearch submit` finishes (and one can be stopped), and bad addresses are one line with exit 2."""

import json
import os

import optuna
import pytest

from tests.conftest import (
    RUNNER_SPACE,
    check_every_place_once,
    free_port,
    processes_mentioning,
    run_cli,
    search_args,
    space_file,
)

pytestmark = pytest.mark.ray


@pytest.fixture
def space(tmp_path):
    return space_file(tmp_path, RUNNER_SPACE)


@pytest.fixture(autouse=True)
def no_auth(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _args(tiny_folder, text_file, space, out, *extra):
    return search_args(tiny_folder, text_file, space, out, "--json", *extra)


def test_ray_runner_starts_its_own_cluster_and_finds_the_local_winner(tiny_folder, text_file, space,
                                                                      tmp_path):
    local = run_cli(*_args(tiny_folder, text_file, space, tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    ray = run_cli(*_args(tiny_folder, text_file, space, tmp_path / "ray", "--runner", "ray", "--workers", "2",
                         "--worker-threads", "1"))
    assert ray.returncode == 0, ray.stderr
    ours, theirs = json.loads(local.stdout), json.loads(ray.stdout)  # Tune's tables stay off stdout
    assert theirs["layers"] == ours["layers"] and theirs["fitness"] == ours["fitness"]
    assert theirs["study"]["trials"] == ours["study"]["trials"]
    assert theirs["config"]["runner"] == "ray"

    study = optuna.load_study(study_name=theirs["study"]["name"], storage=f"sqlite:///{tmp_path / 'ray/study.db'}")
    check_every_place_once(study.trials)
    # every stage a trial reported was evaluated by a Ray worker, each of which loaded each supernet once
    workers = theirs["workers"]
    assert sum(w["stages"] for w in workers.values()) == sum(len(t.intermediate_values) for t in study.trials)
    assert all(1 <= w["supernet_loads"] <= len(theirs["iterations"]) for w in workers.values())
    assert {t.user_attrs["worker"] for t in study.trials} <= set(workers)
    assert str(os.getpid()) not in {name.rsplit(":", 1)[1] for name in workers}  # not evaluated here
    # the local cluster it started is gone
    import ray as ray_module

    assert not ray_module.is_initialized()
    assert not processes_mentioning("tyrsearch-ray-")


def test_submitted_search_runs_on_the_cluster(ray_cluster, tiny_folder, text_file, space, tmp_path):
    out = tmp_path / "job"
    submitted = run_cli("submit", "--address", ray_cluster["jobs"], "--json", "--",
                        *_args(tiny_folder, text_file, space, out, "--runner", "ray", "--workers", "1"))
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    status = run_cli("jobs", "status", job_id, "--address", ray_cluster["jobs"], "--wait", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = run_cli("jobs", "logs", job_id, "--address", ray_cluster["jobs"])
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["runner"] == "ray" and '"runner": "ray"' in logs.stdout
    assert (out / "model" / "config.json").is_file()
    listed = run_cli("jobs", "list", "--address", ray_cluster["jobs"], "--json")
    assert job_id in {job["job_id"] for job in json.loads(listed.stdout)}


def test_stopped_job_reports_stopped(ray_cluster, tiny_folder, text_file, space, tmp_path):
    submitted = run_cli("submit", "--address", ray_cluster["jobs"], "--",
                        *_args(tiny_folder, text_file, space, tmp_path / "stopped"))
    job_id = submitted.stdout.strip()
    stopped = run_cli("jobs", "stop", job_id, "--address", ray_cluster["jobs"])
    assert stopped.returncode == 0 and job_id in stopped.stdout
    status = run_cli("jobs", "status", job_id, "--address", ray_cluster["jobs"], "--wait", "--json")
    assert status.returncode == 1 and json.loads(status.stdout)["status"] == "STOPPED"


@pytest.mark.parametrize(("args", "message"), [
    (["jobs", "status", "raysubmit_nope"], "no job 'raysubmit_nope' on this cluster"),
    (["submit"], "nothing to submit"),
])
def test_bad_job_input_is_one_line_exit_2(ray_cluster, args, message):
    ran = run_cli(*args, "--address", ray_cluster["jobs"])
    assert ran.returncode == 2 and message in ran.stderr and len(ran.stderr.strip().splitlines()) == 1


def test_unreachable_clusters_are_one_line_exit_2_and_write_nothing(tiny_folder, text_file, space,
                                                                     tmp_path):
    port = free_port()  # nothing listens there
    ran = run_cli(*_args(tiny_folder, text_file, space, tmp_path / "out", "--runner", "ray", "--address",
                         f"127.0.0.1:{port}"))
    assert ran.returncode == 2 and "cannot reach the Ray cluster" in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    ran = run_cli("jobs", "list", "--address", f"http://127.0.0.1:{port}")
    assert ran.returncode == 2 and "cannot reach the Ray job server" in ran.stderr

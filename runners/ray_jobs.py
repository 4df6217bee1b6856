"""Searches as Ray Jobs (the Ray Jobs API): submitted to a cluster's job server (its dashboard address,
http://HOST:8265), run there as `python -m tyrsearch.cli ARGS` (the cluster's python must have tyrsearch
installed, as for any Ray job), followed by id. A `search --runner ray` inside the job finds its cluster
through RAY_ADDRESS, which Ray sets for the job.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Iterator

from ray.job_submission import JobStatus, JobSubmissionClient

from tyrsearch.errors import UserError

FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


class Jobs:
    """The job server of one Ray cluster."""

    def __init__(self, address: str):
        try:
            self.client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UserError(f"cannot reach the Ray job server at {address} ({_first_line(error)}); give the "
                            "cluster's dashboard address, e.g. --address http://127.0.0.1:8265") from None

    def submit(self, args: list[str]) -> str:
        """Submit `tyrsearch ARGS` as a job; returns its id."""
        if not args:
            raise UserError("nothing to submit: give the tyrsearch command after --, e.g. -- search --model ...")
        return self.client.submit_job(entrypoint=shlex.join(["python", "-m", "tyrsearch.cli", *args]))

    def status(self, job_id: str) -> dict:
        return _describe(self._call(self.client.get_job_info, job_id))

    def list(self) -> list[dict]:
        return [_describe(info) for info in self.client.list_jobs()]

    def wait(self, job_id: str, *, poll_s: float = 1.0) -> dict:
        """The job's status once it has finished (succeeded, failed or stopped)."""
        while (status := self.status(job_id))["status"] not in {s.value for s in FINAL}:
            time.sleep(poll_s)
        return status

    def logs(self, job_id: str) -> str:
        return self._call(self.client.get_job_logs, job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """The job's output as it comes, until the job ends."""
        self.status(job_id)  # an unknown id fails here, with one line
        stream = self.client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(stream))
                except StopAsyncIteration:
                    return
        finally:
            loop.close()

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False if it had already finished."""
        return self._call(self.client.stop_job, job_id)

    @staticmethod
    def _call(method, job_id: str):
        try:
            return method(job_id)
        except RuntimeError as error:
            if "does not exist" in str(error) or "404" in str(error):
                raise UserError(f"no job {job_id!r} on this cluster; `tyrsearch jobs list` shows them") from None
            raise


def _describe(info) -> dict:
    return {"job_id": info.submission_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint}


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

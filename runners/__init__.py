"""Where a search runs. One seam, `Runner.run(search) -> SearchResult`, and one runner per engine, chosen
by name with `--runner`:

- `local`: this process plans and evaluates (SQLite study in the run folder by default).
- `optuna`: this process plans; `tyrsearch worker` processes (spawned here with --workers N, or started
  on other machines) evaluate, sharing the study through an Optuna RDB storage (PostgreSQL).
- `ray`: this process plans; Ray Tune trials on a Ray cluster evaluate (see ray_tune.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tyrsearch.runners.base import Runner

RUNNERS = ("local", "optuna", "ray")


def make_runner(name: str, *, storage_url: str, study_name: str, workers: int, threads: int | None,
                heartbeat_s: float, address: str | None, device: str = "auto") -> Runner:
    """The runner called `name` (its module is imported here: they load torch, and ray is slow to import)."""
    if name == "local":
        from tyrsearch.runners.local import LocalRunner

        return LocalRunner()
    if name == "optuna":
        from tyrsearch.runners.optuna_workers import OptunaRunner

        return OptunaRunner(storage_url=storage_url, study_name=study_name, workers=workers, threads=threads,
                            heartbeat_s=heartbeat_s, device=device)
    from tyrsearch.runners.ray_tune import RayRunner

    return RayRunner(address=address, workers=workers, threads=threads)

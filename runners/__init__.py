"""Where a search runs. One seam, `Runner.run(search) -> SearchResult`, and one runner per engine, chosen
by name with `--runner`:

- `local`: this process plans and evaluates (SQLite study in the run folder by default).
- `optuna`: this process plans; `tyrsearch worker` processes (spawned here with --workers N, or started
  on other machines) evaluate, sharing the study through an Optuna RDB storage (PostgreSQL).
"""

RUNNERS = ("local", "optuna")  # modules: local.py, optuna_workers.py (imported where used: they load torch)

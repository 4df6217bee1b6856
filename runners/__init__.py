"""Where a search runs (local, Optuna workers, Ray); filled by the runners issue."""

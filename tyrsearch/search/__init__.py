"""The global search over per-layer sparsity distributions (spaces now; the Optuna study next)."""

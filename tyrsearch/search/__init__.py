"""The global search over per-layer sparsity distributions (the knapsack start now; the Optuna study next)."""

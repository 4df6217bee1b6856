"""The global search: the knapsack start, cheap candidate evaluation, the Optuna samplers and the
multi-step selection pruner, and the coarse-to-fine driver that runs them as one study."""

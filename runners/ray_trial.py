"""The ray runner's Tune trainable, apart from everything heavy: ray_tune.py registers this module to be
pickled by value, so Tune's trial actors (which come and go between generations) import only ray, not
torch or transformers. The work itself is done by the long-lived Evaluator actors."""

from __future__ import annotations

import ray
from ray import tune
from ray.util.queue import Queue


def evaluate_stage(config: dict, evaluators: Queue) -> None:
    """One stage of one candidate (config["task"]), evaluated by an idle Evaluator (Tune runs at most as
    many trials at once as there are Evaluators)."""
    evaluator = evaluators.get()
    try:
        result = ray.get(evaluator.evaluate.remote(config["task"]))
    finally:
        evaluators.put(evaluator)
    tune.report(result)

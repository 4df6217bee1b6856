"""tyrsearch: global structural-pruning search for transformer language models.

The Python API (`tyrsearch.api`, re-exported here): `search`, `prune`, `evaluate` and `export`, and for
Mixture-of-Experts models `stun`, `moefy` and `distill` (`tyrsearch.moe.api`).
Importing the package registers the per-layer-shaped model classes with transformers' Auto classes,
so a pruned folder loads with `AutoModelForCausalLM.from_pretrained(folder)`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

import tyrsearch.search  # noqa: F401  (the subpackage first, so that the function below keeps its name)
from tyrsearch.api import distill, evaluate, export, moefy, prune, search, stun
from tyrsearch.errors import ParameterError, UserError
from tyrsearch.modeling import PRUNED_CLASSES
from tyrsearch.results import DistillResult, Evaluation, ExportResult, MoefyResult, PruneResult, SearchResult

for _config_cls, _model_cls in PRUNED_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["DistillResult", "Evaluation", "ExportResult", "MoefyResult", "ParameterError", "PruneResult",
           "SearchResult", "UserError", "distill", "evaluate", "export", "moefy", "prune", "search", "stun"]

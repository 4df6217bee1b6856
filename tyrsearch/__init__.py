"""tyrsearch: global structural-pruning search for transformer language models.

Importing the package registers the per-layer-shaped model classes with transformers' Auto classes,
so a pruned folder loads with `AutoModelForCausalLM.from_pretrained(folder)`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from tyrsearch.modeling import PRUNED_CLASSES

for _config_cls, _model_cls in PRUNED_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)

__version__ = "0.1.0"

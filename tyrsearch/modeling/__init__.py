"""The per-layer-shaped model classes that pruned models are saved and reloaded as."""

from tyrsearch.modeling.modeling_tyr import PRUNED_CLASSES, SkippedAttention, SkippedMLP, reshape_layer

__all__ = ["PRUNED_CLASSES", "SkippedAttention", "SkippedMLP", "reshape_layer"]

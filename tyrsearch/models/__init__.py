"""Family adapters: the prunable units of each supported architecture, chosen by model_type."""

from torch import nn

from tyrsearch.errors import UserError
from tyrsearch.models.base import (
    ATTENTION_UNITS,
    EXPERTS,
    KV_GROUPS,
    MLP,
    Q_HEADS,
    Attention,
    Experts,
    FamilyAdapter,
    GatedMLP,
    KeptUnits,
    LayerShape,
    UnitGroup,
    head_dim,
)
from tyrsearch.models.gemma3 import Gemma3Adapter
from tyrsearch.models.llama import LlamaAdapter
from tyrsearch.models.moe import MixtralAdapter, OlmoeAdapter, Qwen2MoeAdapter

ADAPTERS: tuple[FamilyAdapter, ...] = (
    LlamaAdapter(), Gemma3Adapter(), MixtralAdapter(), Qwen2MoeAdapter(), OlmoeAdapter(),
)
PRUNED_PREFIX = "tyr_"  # model_type of a saved pruned model: "tyr_" + the base family's


def base_model_type(model_type: str) -> str:
    return model_type.removeprefix(PRUNED_PREFIX)


def supported_model_types() -> list[str]:
    return [t for adapter in ADAPTERS for t in adapter.model_types]


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for a loaded model, or a UserError naming the supported architectures."""
    model_type = base_model_type(getattr(model.config, "model_type", "?"))
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UserError(
        f"unsupported architecture {model_type!r}: tyrsearch prunes {', '.join(supported_model_types())} "
        "decoders; convert the model to one of these or open an issue for its family"
    )


__all__ = [
    "ADAPTERS", "ATTENTION_UNITS", "EXPERTS", "KV_GROUPS", "MLP", "Q_HEADS", "Attention", "Experts",
    "FamilyAdapter", "GatedMLP", "KeptUnits", "LayerShape", "UnitGroup", "adapter_for", "base_model_type",
    "head_dim", "supported_model_types",
]

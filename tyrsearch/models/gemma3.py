"""Gemma-3 text decoders: one KV head per layer, so KV groups are not a unit type here."""

from tyrsearch.models.base import MLP, Q_HEADS, FamilyAdapter


class Gemma3Adapter(FamilyAdapter):
    model_types = ("gemma3_text",)
    unit_types = (Q_HEADS, MLP)
    search_space = "gemma3"
    not_prunable = {"kv_groups": "Gemma-3 has a single KV head per layer: only query heads and MLP channels"}

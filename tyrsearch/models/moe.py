"""Mixture-of-Experts decoders: Mixtral, Qwen2-MoE and OLMoE, with routed experts as a unit type.

In transformers 5 an MoE layer's `mlp` is a sparse block: a router `mlp.gate` scores the E routed
experts, each token runs through its top-k, and the experts are fused 3-D parameters:

    mlp.gate.weight              [E, hidden]          one router row per expert
    mlp.experts.gate_up_proj     [E, 2 * I, hidden]   each expert's gate rows, then its up rows
    mlp.experts.down_proj        [E, hidden, I]

An `experts` unit is one routed expert: its router row and its slice of every `mlp.experts.*` tensor,
all on dim 0. Routing stays as the family has it (Mixtral: softmax, top-k, renormalised over the k;
Qwen2-MoE and OLMoE: softmax, top-k, renormalised only with `norm_topk_prob`); with router rows gone
the softmax runs over the kept experts only, so a pruned layer computes exactly what the dense layer
computes when it never routes to the removed experts. Qwen2-MoE's shared expert (and its sigmoid
gate) sees every token and is never an `experts` unit; its `mlp_only_layers` are dense MLPs.
"""

from __future__ import annotations

import torch
from torch import nn

from tyrsearch.errors import UserError
from tyrsearch.models.base import (
    EXPERTS,
    KV_GROUPS,
    MLP,
    Q_HEADS,
    Experts,
    GatedMLP,
    KeptUnits,
    LayerShape,
    UnitGroup,
)
from tyrsearch.models.llama import LlamaAdapter

ROUTER = "mlp.gate.weight"
EXPERT_PREFIX = "mlp.experts."
GATE_UP = EXPERT_PREFIX + "gate_up_proj"
DOWN = EXPERT_PREFIX + "down_proj"


def is_moe_block(mlp: nn.Module) -> bool:
    return hasattr(mlp, "gate") and hasattr(mlp, "experts")


def _check_moe(shape: LayerShape) -> None:
    if not shape.experts:
        raise ValueError("this layer has a dense MLP: it has no experts to group or cut")


class MoEAdapter(LlamaAdapter):
    """Llama-like attention units plus routed experts; the channels inside an expert are not cut."""

    model_types = ()
    unit_types = (KV_GROUPS, Q_HEADS, EXPERTS)
    not_prunable = {MLP: "MoE experts keep their intermediate channels: prune whole experts instead"}
    search_space = "moe"  # per-layer expert counts (STUN picks the experts of each count)

    def mlp(self, layer: nn.Module) -> GatedMLP | None:
        return None if is_moe_block(layer.mlp) else super().mlp(layer)

    def gated_mlps(self, layer: nn.Module) -> list[GatedMLP]:
        shared = getattr(layer.mlp, "shared_expert", None)  # Qwen2-MoE: every token, beside the routed ones
        if shared is None:
            return super().gated_mlps(layer)
        return [*super().gated_mlps(layer), GatedMLP(shared.gate_proj, shared.up_proj, shared.down_proj)]

    def experts(self, layer: nn.Module) -> Experts | None:
        block = layer.mlp
        if not is_moe_block(block):
            return None
        fused = block.experts
        return Experts(router=block.gate.weight, gate_up=fused.gate_up_proj, down=fused.down_proj,
                       top_k=block.gate.top_k, act_fn=fused.act_fn, module=fused)

    def shape(self, layer: nn.Module) -> LayerShape:
        if not is_moe_block(layer.mlp):  # a dense layer (Qwen2-MoE's mlp_only_layers)
            return super().shape(layer)
        kv, q_per_kv = self._attention_units(layer.self_attn)
        experts, _, inter = layer.mlp.experts.down_proj.shape  # [E, hidden, I]
        return LayerShape(kv_heads=kv, q_per_kv=q_per_kv, intermediate=inter, experts=experts)

    def group(self, tensors: dict[str, torch.Tensor], shape: LayerShape, unit_type: str, *,
              head_dim: int) -> UnitGroup:
        if unit_type != EXPERTS:
            return super().group(tensors, shape, unit_type, head_dim=head_dim)
        _check_moe(shape)
        return UnitGroup(
            producers=(tensors[ROUTER][:, None, :],  # [E, hidden] -> [E, 1, hidden]
                       tensors[GATE_UP]),  # [E, 2I, hidden]
            consumer=tensors[DOWN].permute(1, 0, 2),  # [E, hidden, I] -> [hidden, E, I]
        )

    def slice(self, tensors: dict[str, torch.Tensor], shape: LayerShape, unit_type: str,
              selection: KeptUnits, *, head_dim: int) -> tuple[dict[str, torch.Tensor], LayerShape]:
        if unit_type != EXPERTS:
            return super().slice(tensors, shape, unit_type, selection, head_dim=head_dim)
        _check_moe(shape)
        if selection.consumer is not None or selection.bias_shift is not None:
            raise ValueError("experts are removed whole: a refit consumer or bias shift does not apply to them")
        kept = selection.kept
        if len(kept) == 0:  # experts == 0 means a dense MLP in a LayerShape: an MoE layer keeps at least one
            raise ValueError("an MoE layer must keep at least one expert (at least top-k to route tokens)")
        out = {name: t[kept].contiguous() if name == ROUTER or name.startswith(EXPERT_PREFIX) else t
               for name, t in tensors.items()}
        return out, shape.with_units(EXPERTS, len(kept))

    def prune_layer_(self, layer: nn.Module, unit_type: str, selection: KeptUnits, *, layer_idx: int,
                     head_dim: int) -> LayerShape:
        if unit_type == EXPERTS and is_moe_block(layer.mlp):
            top_k = layer.mlp.gate.top_k
            if len(selection.kept) < top_k:
                raise UserError(
                    f"layer {layer_idx}: cannot keep {len(selection.kept)} experts, every token is routed to "
                    f"{top_k} (num_experts_per_tok); keep at least {top_k}"
                )
        return super().prune_layer_(layer, unit_type, selection, layer_idx=layer_idx, head_dim=head_dim)


class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)


class Qwen2MoeAdapter(MoEAdapter):
    model_types = ("qwen2_moe",)


class OlmoeAdapter(MoEAdapter):
    model_types = ("olmoe",)
    unit_types = (EXPERTS,)
    not_prunable = {
        **MoEAdapter.not_prunable,
        KV_GROUPS: "OLMoE's q_norm / k_norm normalise all heads together: cutting heads would change the rest",
        Q_HEADS: "OLMoE's q_norm / k_norm normalise all heads together: cutting heads would change the rest",
    }

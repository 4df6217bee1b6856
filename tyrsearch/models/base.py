"""What is prunable in a decoder layer, and how a cut propagates through the coupled weights.

This is the *structure* half of the Torch-Pruning split: an adapter knows which weights are coupled
to a unit and slices them all; it never decides which units to cut (that is `tyrsearch.local`).

A Llama-like decoder layer has three unit types:

    kv_groups   one KV head with the query heads that read it (GQA group)
                couples q_proj rows [q_per_kv * head_dim], k_proj / v_proj rows [head_dim],
                o_proj columns [q_per_kv * head_dim]
    q_heads     one query head inside a group; every group keeps the same count, so the GQA ratio
                stays uniform inside a layer. couples q_proj rows and o_proj columns [head_dim]
    mlp         one intermediate channel: gate_proj / up_proj rows, down_proj column

A Mixture-of-Experts layer (`tyrsearch.models.moe`) has a fourth:

    experts     one routed expert: its router row and every weight of the expert

head_dim is never cut (RoPE rotates whole heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from tyrsearch.modeling import SkippedAttention, SkippedMLP, reshape_layer

if TYPE_CHECKING:
    from tyrsearch.allocation import Dims

KV_GROUPS = "kv_groups"
Q_HEADS = "q_heads"
MLP = "mlp"
EXPERTS = "experts"
ATTENTION_UNITS = (KV_GROUPS, Q_HEADS)


@dataclass(frozen=True)
class LayerShape:
    """The prunable sizes of one decoder layer. 0 heads or 0 channels: that block is removed.

    `experts` > 0 makes the MLP a Mixture-of-Experts block with that many routed experts, each with
    `intermediate` channels; 0 is a dense MLP (every non-MoE layer).
    """

    kv_heads: int
    q_per_kv: int
    intermediate: int
    experts: int = 0

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.q_per_kv

    def units(self, unit_type: str) -> int:
        """How many units of this type the layer keeps (q_heads counts per group)."""
        return {KV_GROUPS: self.kv_heads, Q_HEADS: self.q_per_kv, MLP: self.intermediate,
                EXPERTS: self.experts}[unit_type]

    def with_units(self, unit_type: str, keep: int) -> LayerShape:
        field = {KV_GROUPS: "kv_heads", Q_HEADS: "q_per_kv", MLP: "intermediate", EXPERTS: "experts"}[unit_type]
        return replace(self, **{field: keep})

    def block_config(self, *, o_proj_bias: bool = False, down_proj_bias: bool = False) -> dict:
        """The entry this layer gets in a saved model's `block_configs` (`num_experts` only in MoE layers)."""
        block = {
            "num_attention_heads": self.q_heads,
            "num_key_value_heads": self.kv_heads if self.q_heads else 0,
            "intermediate_size": self.intermediate,
            "o_proj_bias": o_proj_bias,
            "down_proj_bias": down_proj_bias,
        }
        if self.experts:
            block["num_experts"] = self.experts
        return block


def head_dim(config) -> int:
    """Channels per attention head: the config's, or hidden / heads where it has none (Qwen2-MoE, OLMoE)
    or None (Mixtral)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Attention:
    """The linears of a kept attention block."""

    q: nn.Linear  # [q_heads * head_dim, hidden]
    k: nn.Linear  # [kv_heads * head_dim, hidden]
    v: nn.Linear  # [kv_heads * head_dim, hidden]
    o: nn.Linear  # [hidden, q_heads * head_dim]


@dataclass(frozen=True)
class GatedMLP:
    """The linears of a kept dense MLP: down(act(gate x) * up x)."""

    gate: nn.Linear  # [I, hidden]
    up: nn.Linear  # [I, hidden]
    down: nn.Linear  # [hidden, I]


RoutingHook = Callable[[torch.Tensor, torch.Tensor], None]  # (hidden [T, H], top_k_index [T, k])


@dataclass(frozen=True)
class Experts:
    """The routed experts of an MoE block, as fused parameters with one expert per row of dim 0."""

    router: nn.Parameter  # [E, hidden]: one router row per expert
    gate_up: nn.Parameter  # [E, 2I, hidden]: each expert's gate rows, then its up rows
    down: nn.Parameter  # [E, hidden, I]
    top_k: int  # experts per token
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module  # the fused experts module, called as experts(hidden, top_k_index, top_k_weights)

    @property
    def count(self) -> int:
        return self.router.shape[0]

    def on_routing(self, hook: RoutingHook):
        """Call `hook` with every batch of tokens routed through the experts; returns the removable handle."""

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
            hook(hidden, index.reshape(hidden.shape[0], -1))  # [T, k]

        return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@dataclass(frozen=True)
class UnitGroup:
    """One unit type of one layer as a criterion sees it: plain tensors grouped by unit.

    U units in `blocks` equal runs of consecutive units; a criterion keeps the same count in every
    block (q_heads: one block per KV group). `width` consumer columns belong to each unit.
    """

    producers: tuple[torch.Tensor, ...]  # each [U, rows_per_unit, in_features]: weights that make the unit
    consumer: torch.Tensor  # [out_features, U, width]: the weight that reads the unit (o_proj / down_proj)
    blocks: int = 1
    xtx: torch.Tensor | None = None  # [U * width, U * width] float64: sum over tokens of x x^T, x = consumer input
    x_sum: torch.Tensor | None = None  # [U * width] float64: sum over tokens of x
    tokens: int = 0
    saliency: torch.Tensor | None = None  # [U]: first-order loss change sum(w * dL/dw) over coupled weights
    coselection: torch.Tensor | None = None  # [U, U] experts: tokens whose top-k holds both (diagonal: one)

    @property
    def units(self) -> int:
        return self.consumer.shape[1]

    @property
    def width(self) -> int:
        return self.consumer.shape[2]

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        """Consumer-input columns of the given units, [len(units) * width]."""
        return (units[:, None] * self.width + torch.arange(self.width)).reshape(-1)


@dataclass(frozen=True)
class KeptUnits:
    """What a criterion returns: the units to keep and, optionally, a reconstructed consumer."""

    kept: torch.Tensor  # [K] unit indices, ascending
    consumer: torch.Tensor | None = None  # [out_features, K * width]: refit consumer weight
    bias_shift: torch.Tensor | None = None  # [out_features]: added to the consumer's bias (created if absent)


class FamilyAdapter:
    """Units and coupled slicing of a family of decoder-only models (weights named like Llama's)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    unit_types: ClassVar[tuple[str, ...]] = (KV_GROUPS, Q_HEADS, MLP)
    # why a unit type is missing from `unit_types`, for the user
    not_prunable: ClassVar[dict[str, str]] = {}
    search_space: ClassVar[str] = ""  # the bundled search space (search_spaces/NAME.yaml) of the family

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def head_dim(self, model: nn.Module) -> int:
        return head_dim(model.config)

    def dims(self, model: nn.Module) -> Dims:
        """The dense dimensions a layer's parameter count needs."""
        from tyrsearch.allocation import Dims  # allocation builds on the layer shapes defined here

        return Dims(hidden=model.config.hidden_size, head_dim=self.head_dim(model))

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [b, L, V] from the last decoder layer's output [b, L, hidden]."""
        logits = model.lm_head(model.model.norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    # -- the layer's weights by role: what statistics, OWL, STUN and smoothing read --------------------

    def attention(self, layer: nn.Module) -> Attention | None:
        """The attention linears, None where the block was removed."""
        attn = layer.self_attn
        return None if isinstance(attn, SkippedAttention) else Attention(attn.q_proj, attn.k_proj, attn.v_proj,
                                                                         attn.o_proj)

    def mlp(self, layer: nn.Module) -> GatedMLP | None:
        """The dense MLP's linears, None where the block was removed (or is routed experts)."""
        mlp = layer.mlp
        return None if isinstance(mlp, SkippedMLP) else GatedMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def gated_mlps(self, layer: nn.Module) -> list[GatedMLP]:
        """Every dense gated MLP a token passes through in the layer (an MoE layer's shared expert too)."""
        mlp = self.mlp(layer)
        return [mlp] if mlp is not None else []

    def experts(self, layer: nn.Module) -> Experts | None:
        """The routed experts, None in a layer without them."""
        return None

    def shape(self, layer: nn.Module) -> LayerShape:
        kv, q_per_kv = self._attention_units(layer.self_attn)
        mlp = layer.mlp
        inter = 0 if isinstance(mlp, SkippedMLP) else mlp.down_proj.in_features
        return LayerShape(kv_heads=kv, q_per_kv=q_per_kv, intermediate=inter)

    @staticmethod
    def _attention_units(attn: nn.Module) -> tuple[int, int]:
        """(KV heads, query heads per KV head) of an attention block."""
        if isinstance(attn, SkippedAttention):
            return 0, 0
        kv = attn.k_proj.out_features // attn.head_dim
        return kv, attn.q_proj.out_features // attn.head_dim // kv

    def shapes(self, model: nn.Module) -> list[LayerShape]:
        return [self.shape(layer) for layer in self.layers(model)]

    def consumer(self, layer: nn.Module, unit_type: str) -> nn.Linear | None:
        """The linear whose input carries the units (None when the block is removed, or is routed experts:
        no single linear reads them, each token's input goes to its own top-k)."""
        if unit_type in ATTENTION_UNITS:
            attention = self.attention(layer)
            return None if attention is None else attention.o
        mlp = self.mlp(layer)
        return None if mlp is None else mlp.down

    # -- the unit -> weight map, shared by grouping and slicing ------------------------------------

    def _coupling(self, shape: LayerShape, unit_type: str, head_dim: int):
        """(producer names, rows per unit of each, consumer name, columns per unit, blocks)."""
        if unit_type == KV_GROUPS:
            qw = shape.q_per_kv * head_dim
            return (("self_attn.q_proj", qw), ("self_attn.k_proj", head_dim), ("self_attn.v_proj", head_dim)), \
                "self_attn.o_proj", qw, 1
        if unit_type == Q_HEADS:
            return (("self_attn.q_proj", head_dim),), "self_attn.o_proj", head_dim, shape.kv_heads
        if unit_type == MLP:
            return (("mlp.gate_proj", 1), ("mlp.up_proj", 1)), "mlp.down_proj", 1, 1
        raise ValueError(f"unknown unit type {unit_type!r}; known: {KV_GROUPS}, {Q_HEADS}, {MLP}")

    def group(self, tensors: dict[str, torch.Tensor], shape: LayerShape, unit_type: str, *,
              head_dim: int) -> UnitGroup:
        """A criterion's view of `tensors` (a layer's state dict) for one unit type."""
        producers, consumer, width, blocks = self._coupling(shape, unit_type, head_dim)
        units = shape.q_heads if unit_type == Q_HEADS else shape.units(unit_type)
        out_features = tensors[f"{consumer}.weight"].shape[0]
        return UnitGroup(
            # [U * rows, in] -> [U, rows, in]
            producers=tuple(tensors[f"{name}.weight"].reshape(units, rows, -1) for name, rows in producers),
            # [out, U * width] -> [out, U, width]
            consumer=tensors[f"{consumer}.weight"].reshape(out_features, units, width),
            blocks=blocks,
        )

    def slice(self, tensors: dict[str, torch.Tensor], shape: LayerShape, unit_type: str,
              selection: KeptUnits, *, head_dim: int) -> tuple[dict[str, torch.Tensor], LayerShape]:
        """Keep `selection.kept` units in a layer's state dict; every coupled weight is cut."""
        producers, consumer, width, blocks = self._coupling(shape, unit_type, head_dim)
        kept = selection.kept
        keep = len(kept) // blocks
        out = dict(tensors)
        for name, rows in producers:
            idx = (kept[:, None] * rows + torch.arange(rows)).reshape(-1)
            out[f"{name}.weight"] = tensors[f"{name}.weight"][idx].contiguous()
            if f"{name}.bias" in tensors:
                out[f"{name}.bias"] = tensors[f"{name}.bias"][idx].contiguous()
        cols = (kept[:, None] * width + torch.arange(width)).reshape(-1)
        old = tensors[f"{consumer}.weight"]
        new_consumer = selection.consumer if selection.consumer is not None else old[:, cols]
        out[f"{consumer}.weight"] = new_consumer.to(device=old.device, dtype=old.dtype).contiguous()
        if selection.bias_shift is not None:
            bias = tensors.get(f"{consumer}.bias", old.new_zeros(old.shape[0]))
            out[f"{consumer}.bias"] = (bias.double() + selection.bias_shift.to(bias.device)).to(old.dtype)
        new_shape = shape.with_units(unit_type, keep)
        if new_shape.units(unit_type) == 0:
            prefix = "self_attn." if unit_type in ATTENTION_UNITS else "mlp."
            out = {k: v for k, v in out.items() if not k.startswith(prefix)}
        return out, new_shape

    def prune_layer_(self, layer: nn.Module, unit_type: str, selection: KeptUnits, *, layer_idx: int,
                     head_dim: int) -> LayerShape:
        """Physically cut one unit type of `layer` in place; returns the new shape."""
        shape = self.shape(layer)
        state, new_shape = self.slice(layer.state_dict(), shape, unit_type, selection, head_dim=head_dim)
        block = new_shape.block_config(
            o_proj_bias="self_attn.o_proj.bias" in state, down_proj_bias="mlp.down_proj.bias" in state
        )
        reshape_layer(layer, block, layer_idx=layer_idx, head_dim=head_dim)
        layer.load_state_dict(state, strict=True)
        return new_shape

"""Decoders whose layers each have their own shape, as tyrsearch saves them after structural pruning.

This file is self-contained (torch + transformers only): it is copied next to the weights of every
saved model, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads a pruned
model where tyrsearch is not installed. Inside tyrsearch the same classes are registered with the Auto
classes, so `import tyrsearch` is enough.

The config is the base family's config (every dense shape kept, so its validation still holds) plus
`block_configs`: one entry per decoder layer, as Nemotron-NAS / DeciLM do:

    {"num_attention_heads": Q, "num_key_value_heads": KV, "intermediate_size": I,
     "o_proj_bias": bool, "down_proj_bias": bool}

Q == 0 or KV == 0 means the layer's attention block is removed; I == 0 means its MLP is removed.
`head_dim` is never pruned (RoPE dims stay whole), so Q heads make q_proj [Q * head_dim, hidden].

A Mixture-of-Experts layer's entry also has `"num_experts": E`, the routed experts it keeps (I is then
each expert's intermediate size): router weight [E, hidden], fused experts gate_up_proj [E, 2 * I, hidden]
and down_proj [E, hidden, I]. The router's softmax runs over those E experts only; top-k is unchanged.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)


class SkippedAttention(nn.Module):
    """An attention block with no heads left: adds nothing to the residual stream.

    It still appends one head of zero keys/values to the cache so that the cache keeps counting the
    sequence: positions and mask sizes are read from the cache of layer 0, which may be a skipped one,
    and a cache layer with no elements counts as empty.
    """

    def __init__(self, *, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            batch, seq, _ = hidden_states.shape
            zeros = hidden_states.new_zeros(batch, 1, seq, self.head_dim)  # [batch, kv_heads=1, seq, head_dim]
            cache.update(zeros, zeros, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """An MLP block with no channels left: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _linear(like: nn.Linear, *, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    w = like.weight
    return nn.Linear(in_features, out_features, bias=bias, device=w.device, dtype=w.dtype)


def _parameter(like: nn.Parameter, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=like.device, dtype=like.dtype))


def _reshape_experts(moe: nn.Module, *, experts: int, intermediate: int) -> None:
    """A sparse MoE block keeps `experts` routed experts (a shared expert, if any, is left as it is)."""
    router, bank = moe.gate, moe.experts
    hidden = router.weight.shape[1]
    router.weight = _parameter(router.weight, experts, hidden)
    bank.gate_up_proj = _parameter(bank.gate_up_proj, experts, 2 * intermediate, hidden)
    bank.down_proj = _parameter(bank.down_proj, experts, hidden, intermediate)
    # every experts implementation sizes its one-hot / sentinel expert ids by num_experts
    router.num_experts = bank.num_experts = experts
    bank.intermediate_dim = intermediate


def reshape_layer(layer: nn.Module, block: dict, *, layer_idx: int, head_dim: int) -> None:
    """Give one decoder layer the shapes of `block` (weights are uninitialised; load them after)."""
    attn, mlp = layer.self_attn, layer.mlp
    q_heads, kv_heads = block["num_attention_heads"], block["num_key_value_heads"]
    if q_heads == 0 or kv_heads == 0:
        layer.self_attn = SkippedAttention(layer_idx=layer_idx, head_dim=head_dim)
    elif not isinstance(attn, SkippedAttention):
        hidden = attn.q_proj.in_features
        attn.q_proj = _linear(attn.q_proj, in_features=hidden, out_features=q_heads * head_dim,
                              bias=attn.q_proj.bias is not None)
        attn.k_proj = _linear(attn.k_proj, in_features=hidden, out_features=kv_heads * head_dim,
                              bias=attn.k_proj.bias is not None)
        attn.v_proj = _linear(attn.v_proj, in_features=hidden, out_features=kv_heads * head_dim,
                              bias=attn.v_proj.bias is not None)
        attn.o_proj = _linear(attn.o_proj, in_features=q_heads * head_dim, out_features=hidden,
                              bias=attn.o_proj.bias is not None or block.get("o_proj_bias", False))
        attn.num_key_value_groups = q_heads // kv_heads  # read by repeat_kv in every attention backend
    inter = block["intermediate_size"]
    if block.get("num_experts", 0):
        _reshape_experts(mlp, experts=block["num_experts"], intermediate=inter)
    elif inter == 0:
        layer.mlp = SkippedMLP()
    elif not isinstance(mlp, SkippedMLP):
        hidden = mlp.gate_proj.in_features
        mlp.gate_proj = _linear(mlp.gate_proj, in_features=hidden, out_features=inter,
                                bias=mlp.gate_proj.bias is not None)
        mlp.up_proj = _linear(mlp.up_proj, in_features=hidden, out_features=inter,
                              bias=mlp.up_proj.bias is not None)
        mlp.down_proj = _linear(mlp.down_proj, in_features=inter, out_features=hidden,
                                bias=mlp.down_proj.bias is not None or block.get("down_proj_bias", False))
        mlp.intermediate_size = inter


def _head_dim(config) -> int:
    # MoE configs may leave head_dim unset (None or absent): their attention then derives it like this
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class _PerLayerShapes:
    """Mixin for a CausalLM: after the dense layers are built, give each its pruned shape."""

    def __init__(self, config):
        super().__init__(config)
        for i, block in enumerate(config.block_configs or []):
            reshape_layer(self.model.layers[i], block, layer_idx=i, head_dim=_head_dim(config))
        self.post_init()


class _PerLayerExperts(_PerLayerShapes):
    """Mixin for an MoE CausalLM: per-layer shapes, expert counts included."""

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers enables the fast experts kernels (grouped_mm, ...) only for classes whose source file
        # applies its experts decorator; ours reuse transformers' decorated experts modules, so they qualify,
        # and a reloaded model runs the same kernel as the model it was saved from. (The decorator's name
        # must not appear in this file: the check is a substring search, and the dense classes here would
        # then claim kernels that their inner models refuse.)
        return True


# One (config, model) pair per base family. Configs are strict dataclasses in transformers 5:
# the extra field is declared, never set ad hoc.


@strict
class TyrLlamaConfig(LlamaConfig):
    model_type = "tyr_llama"
    block_configs: list | None = None


@strict
class TyrMistralConfig(MistralConfig):
    model_type = "tyr_mistral"
    block_configs: list | None = None


@strict
class TyrQwen2Config(Qwen2Config):
    model_type = "tyr_qwen2"
    block_configs: list | None = None


@strict
class TyrGemma3TextConfig(Gemma3TextConfig):
    model_type = "tyr_gemma3_text"
    block_configs: list | None = None


@strict
class TyrMixtralConfig(MixtralConfig):
    model_type = "tyr_mixtral"
    block_configs: list | None = None


@strict
class TyrQwen2MoeConfig(Qwen2MoeConfig):
    model_type = "tyr_qwen2_moe"
    block_configs: list | None = None


@strict
class TyrOlmoeConfig(OlmoeConfig):
    model_type = "tyr_olmoe"
    block_configs: list | None = None


class TyrLlamaForCausalLM(_PerLayerShapes, LlamaForCausalLM):
    config_class = TyrLlamaConfig


class TyrMistralForCausalLM(_PerLayerShapes, MistralForCausalLM):
    config_class = TyrMistralConfig


class TyrQwen2ForCausalLM(_PerLayerShapes, Qwen2ForCausalLM):
    config_class = TyrQwen2Config


class TyrGemma3ForCausalLM(_PerLayerShapes, Gemma3ForCausalLM):
    config_class = TyrGemma3TextConfig


class TyrMixtralForCausalLM(_PerLayerExperts, MixtralForCausalLM):
    config_class = TyrMixtralConfig


class TyrQwen2MoeForCausalLM(_PerLayerExperts, Qwen2MoeForCausalLM):
    config_class = TyrQwen2MoeConfig


class TyrOlmoeForCausalLM(_PerLayerExperts, OlmoeForCausalLM):
    config_class = TyrOlmoeConfig


# base model_type -> (pruned config class, pruned model class)
PRUNED_CLASSES = {
    "llama": (TyrLlamaConfig, TyrLlamaForCausalLM),
    "mistral": (TyrMistralConfig, TyrMistralForCausalLM),
    "qwen2": (TyrQwen2Config, TyrQwen2ForCausalLM),
    "gemma3_text": (TyrGemma3TextConfig, TyrGemma3ForCausalLM),
    "mixtral": (TyrMixtralConfig, TyrMixtralForCausalLM),
    "qwen2_moe": (TyrQwen2MoeConfig, TyrQwen2MoeForCausalLM),
    "olmoe": (TyrOlmoeConfig, TyrOlmoeForCausalLM),
}

"""The two graphs a decoder ships as, as torch modules with plain tensor inputs and outputs (what the ONNX
exporter traces), named as Optimum and onnxruntime-genai name them.

- prefill: input_ids [batch, seq], attention_mask [batch, seq] -> logits [batch, seq | 1, vocab]
- decoder (KV cache): input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq],
  past_key_values.{i}.key|value [batch, kv_heads_i, past, head_dim]
  -> logits [batch, seq, vocab], present.{i}.key|value [batch, kv_heads_i, past + seq, head_dim]

kv_heads_i is layer i's own (pruned) count; a layer whose attention was removed carries one head of
zeros (the cache of layer 0 counts the positions, see SkippedAttention), so every layer keeps its name.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from tyrsearch.models import adapter_for


def kv_heads(model: PreTrainedModel) -> list[int]:
    """Each decoder layer's key/value head count as the model has it (pruned or dense)."""
    blocks = getattr(model.config, "block_configs", None)
    if blocks:
        return [b["num_key_value_heads"] if b["num_attention_heads"] and b["num_key_value_heads"] else 1
                for b in blocks]
    return [model.config.num_key_value_heads] * model.config.num_hidden_layers


def head_dim(model: PreTrainedModel) -> int:
    return adapter_for(model).head_dim(model)


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class PrefillGraph(nn.Module):
    """input_ids, attention_mask -> logits (of the last position only with `last_only`)."""

    def __init__(self, model: PreTrainedModel, *, last_only: bool = False):
        super().__init__()
        self.model, self.last_only = model, last_only

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = 1 if self.last_only else 0  # logits_to_keep: 0 keeps every position
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          logits_to_keep=keep).logits


class DecoderGraph(nn.Module):
    """One generation step with the KV cache as plain tensors: the past goes into a DynamicCache, the
    cache after the step comes out as the present."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model, self.layers = model, model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)  # [batch, kv_heads_i, past, head_dim]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True).logits
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


def empty_past(model: PreTrainedModel, *, batch: int, past: int = 0) -> list[torch.Tensor]:
    """Past key/values of `past` zero positions for every layer (past=0: a prefill through the decoder)."""
    dim, dtype = head_dim(model), model.dtype
    return [torch.zeros(batch, heads, past, dim, dtype=dtype) for heads in kv_heads(model) for _ in range(2)]

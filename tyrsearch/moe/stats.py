"""STUN's calibration: one forward pass over the calibration batches collects everything both stages need.

Forward hooks on the dense model record, per decoder layer:

- in an MoE layer, from the routing that the experts block receives (each token's top-k expert ids, the
  top-k of the router logits): how many tokens co-select each pair of experts ([E, E], the diagonal is
  how many tokens select each expert);
- the sums over tokens of x_j^2 of every input that Wanda scores, so ||x_j|| = sqrt(sum x_j^2):
  the attention input (q/k/v read it), the o_proj input, and in an MoE layer, per expert and over only
  the tokens routed to that expert, the expert's input (gate_up_proj reads it) and its intermediate
  activation act(gate) * up (down_proj reads it); a dense MLP layer's gate/up and down_proj inputs.

The number of model calls is ceil(sequences / batch_size) whatever the number of layers or experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tyrsearch.models import Experts, FamilyAdapter

# keys of LayerStats.sq_sums
ATTENTION_IN, O_IN = "attention_in", "o_proj_in"  # [hidden], [q_heads * head_dim]
MLP_IN, MLP_MID = "mlp_in", "down_proj_in"  # dense MLP: [hidden], [intermediate]
EXPERT_IN, EXPERT_MID = "expert_in", "expert_down_in"  # MoE: [E, hidden], [E, intermediate], routed tokens only


def co_selection(top_k_index: torch.Tensor, experts: int) -> torch.Tensor:
    """[E, E] int64: entry (i, j) counts the tokens whose top-k holds both i and j; (i, i) those that hold i.

    top_k_index [tokens, k] holds k distinct expert ids per token.
    """
    selected = F.one_hot(top_k_index, experts).sum(1)  # [tokens, E], 0/1
    return selected.T @ selected


@dataclass
class LayerStats:
    """What the calibration pass saw in one decoder layer (float64 sums over tokens)."""

    sq_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # input name -> sum of x_j^2 (see keys above)
    co_selection: torch.Tensor | None = None  # [E, E] int64 in an MoE layer, else None
    tokens: int = 0  # tokens routed through the layer's experts (MoE layers)

    def norms(self, key: str) -> torch.Tensor:
        """||x_j|| over the calibration tokens, the Wanda factor."""
        return self.sq_sums[key].sqrt()

    def keep_experts(self, kept: torch.Tensor) -> LayerStats:
        """The statistics of the kept experts only (after the expert stage renumbers them 0..K-1)."""
        sums = {k: v[kept] if k in (EXPERT_IN, EXPERT_MID) else v for k, v in self.sq_sums.items()}
        return replace(self, sq_sums=sums, co_selection=self.co_selection[kept][:, kept])


class _Recorder:
    """Accumulates into one LayerStats from hooks on that layer's modules."""

    def __init__(self, stats: LayerStats):
        self.stats = stats

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # [tokens, D]
        sums = x.pow(2).sum(0)
        self.stats.sq_sums[key] = self.stats.sq_sums[key] + sums if key in self.stats.sq_sums else sums

    def linear_hook(self, key: str):
        return lambda module, args: self.add(key, args[0])

    def routing_hook(self, experts: Experts):
        """Counts co-selections and the routed tokens' input and intermediate sums per expert."""

        def record(hidden: torch.Tensor, index: torch.Tensor) -> None:  # [T, H], [T, k]
            counts = co_selection(index, experts.count)
            self.stats.co_selection = counts if self.stats.co_selection is None else self.stats.co_selection + counts
            self.stats.tokens += hidden.shape[0]
            x_sums = hidden.new_zeros(experts.count, hidden.shape[1], dtype=torch.float64)
            mid_sums = hidden.new_zeros(experts.count, experts.down.shape[2], dtype=torch.float64)
            for e in range(experts.count):
                x = hidden[(index == e).any(-1)]  # [tokens routed to e, H]
                if len(x):
                    gate, up = F.linear(x, experts.gate_up[e]).chunk(2, dim=-1)  # gate rows, then up rows
                    x_sums[e] = x.double().pow(2).sum(0)
                    mid_sums[e] = (experts.act_fn(gate) * up).double().pow(2).sum(0)
            for key, sums in ((EXPERT_IN, x_sums), (EXPERT_MID, mid_sums)):
                self.stats.sq_sums[key] = self.stats.sq_sums[key] + sums if key in self.stats.sq_sums else sums

        return record


@torch.no_grad()
def collect(model: nn.Module, adapter: FamilyAdapter, batches: torch.Tensor, *,
            batch_size: int = 8, progress: bool = False) -> tuple[list[LayerStats], int]:
    """One pass over `batches` [n, seq]: each decoder layer's statistics, and the number of model calls."""
    stats = [LayerStats() for _ in adapter.layers(model)]
    handles = []
    for layer, layer_stats in zip(adapter.layers(model), stats, strict=True):
        recorder = _Recorder(layer_stats)
        attn, mlp, experts = adapter.attention(layer), adapter.mlp(layer), adapter.experts(layer)
        if attn is not None:
            handles.append(attn.q.register_forward_pre_hook(recorder.linear_hook(ATTENTION_IN)))
            handles.append(attn.o.register_forward_pre_hook(recorder.linear_hook(O_IN)))
        if experts is not None:
            handles.append(experts.on_routing(recorder.routing_hook(experts)))
        elif mlp is not None:
            handles.append(mlp.gate.register_forward_pre_hook(recorder.linear_hook(MLP_IN)))
            handles.append(mlp.down.register_forward_pre_hook(recorder.linear_hook(MLP_MID)))
    calls = 0
    try:
        for chunk in tqdm(batches.split(batch_size), desc="calibration", disable=not progress):
            # the hooks need no LM head output
            model(input_ids=chunk.to(model.device), use_cache=False, logits_to_keep=1)
            calls += 1
    finally:
        for handle in handles:
            handle.remove()
    return stats, calls

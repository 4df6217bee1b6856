"""The metanetwork: a message-passing GNN over a network's parameter graph that outputs new weights.

Each layer passes messages both ways along every edge (forward: from the neuron that feeds it;
backward: from the neuron it feeds, so a neuron also sees how it is used), aggregates them with
several aggregations at once (mean, max, std by default), then updates the nodes and the edges. The
decoders give a delta for every feature slot; only trainable slots (the graph's masks) get it, and
their last layer starts at zero, so an untrained metanetwork returns its input network unchanged and
training learns the rewrite as new = old + delta.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Data
from torch_geometric.nn import MessagePassing

from tyrsearch.meta.graph import EDGE_TYPES, NODE_TYPES, layout_for
from tyrsearch.meta.nets import NetConfig, build


@dataclass(frozen=True)
class MetaNetConfig:
    node_dim: int  # Dn of the graphs it reads (the layout's)
    edge_dim: int  # De
    hidden: int = 32
    layers: int = 3
    aggregations: tuple[str, ...] = ("mean", "max", "std")

    def to_dict(self) -> dict:
        return {**asdict(self), "aggregations": list(self.aggregations)}

    @classmethod
    def from_dict(cls, data: dict) -> MetaNetConfig:
        return cls(**{**data, "aggregations": tuple(data["aggregations"])})


def _mlp(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


class EdgeNodeLayer(MessagePassing):
    """One round: bidirectional messages from (receiver, sender, edge), multi-aggregated, then residual
    node and edge updates. Node states [N, h], edge states [E, h] in and out.

    Every MLP over a concatenation [a, b, e] starts with a linear layer, which is split into one per
    part: the node parts are computed once per node and gathered, so an edge costs about half as much
    (edges outnumber nodes 30 to 100 times in these graphs)."""

    def __init__(self, *, hidden: int, aggregations: tuple[str, ...]) -> None:
        super().__init__(aggr=list(aggregations), aggr_kwargs={"mode": "cat"})  # -> [N, len(aggregations) * h]
        h = hidden
        self.node_parts = nn.Linear(h, 4 * h, bias=False)  # forward receiver, sender; backward receiver, sender
        self.edge_parts = nn.Linear(h, 3 * h)  # forward message, backward message, edge update
        self.forward_out, self.backward_out = nn.Linear(h, h), nn.Linear(h, h)
        self.node_mlp = _mlp((1 + 2 * len(aggregations)) * h, h, h)
        self.edge_ends = nn.Linear(h, 2 * h, bias=False)  # the edge update's source and target parts
        self.edge_out = nn.Linear(h, h)
        # norms keep the states' scale fixed across layers whatever the weights' magnitudes
        self.node_norm, self.edge_norm = nn.LayerNorm(h), nn.LayerNorm(h)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fwd_recv, fwd_send, bwd_recv, bwd_send = self.node_parts(x).chunk(4, dim=-1)  # [N, h] each
        fwd_edge, bwd_edge, upd_edge = self.edge_parts(e).chunk(3, dim=-1)  # [E, h] each
        downstream = self.propagate(edge_index, recv=fwd_recv, send=fwd_send, e=fwd_edge, out=self.forward_out)
        upstream = self.propagate(edge_index.flip(0), recv=bwd_recv, send=bwd_send, e=bwd_edge,
                                  out=self.backward_out)
        x = self.node_norm(x + self.node_mlp(torch.cat([x, downstream, upstream], dim=-1)))
        src_part, dst_part = self.edge_ends(x).chunk(2, dim=-1)
        src, dst = edge_index
        e = self.edge_norm(e + self.edge_out(F.silu(src_part[src] + dst_part[dst] + upd_edge)))
        return x, e

    def message(self, recv_i: torch.Tensor, send_j: torch.Tensor, e: torch.Tensor, out: nn.Module) -> torch.Tensor:
        return out(F.silu(recv_i + send_j + e))  # [E, h]: _i the receiving node, _j the sending one


class MetaNet(nn.Module):
    def __init__(self, *, config: MetaNetConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.node_in = nn.Linear(config.node_dim, h)
        self.edge_in = nn.Linear(config.edge_dim, h)
        self.node_kind = nn.Embedding(len(NODE_TYPES), h)
        self.edge_kind = nn.Embedding(len(EDGE_TYPES), h)
        self.layers = nn.ModuleList(EdgeNodeLayer(hidden=h, aggregations=config.aggregations)
                                    for _ in range(config.layers))
        self.node_out = _mlp(h, config.node_dim, h)
        self.edge_out = _mlp(h, config.edge_dim, h)
        for decoder in (self.node_out, self.edge_out):
            nn.init.zeros_(decoder[-1].weight)
            nn.init.zeros_(decoder[-1].bias)

    def forward(self, graph: Data) -> tuple[torch.Tensor, torch.Tensor]:
        """New node features [N, Dn] and edge features [E, De]: the input's plus masked deltas."""
        x = self.node_in(graph.x) + self.node_kind(graph.node_type)
        e = self.edge_in(graph.edge_attr) + self.edge_kind(graph.edge_type)
        for layer in self.layers:
            x, e = layer(x, graph.edge_index, e)
        return (graph.x + self.node_out(x) * graph.node_mask,
                graph.edge_attr + self.edge_out(e) * graph.edge_mask)


@torch.no_grad()
def rewrite(metanet: MetaNet, model: nn.Module, config: NetConfig) -> nn.Module:
    """A copy of `model` with the metanetwork's weights (buffers such as BatchNorm statistics kept)."""
    layout = layout_for(config)
    state = model.state_dict()
    x, edge_attr = metanet(layout.to_graph(state))
    rewritten = build(config)
    new = layout.to_state(x, edge_attr)
    params = {name for name, _ in model.named_parameters()}
    rewritten.load_state_dict({k: new[k] if k in params else v for k, v in state.items()}, strict=True)
    return rewritten.eval()

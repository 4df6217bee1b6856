"""Network <-> graph, exact in both directions (the parameter graphs of Graph Metanetworks, Lim et al.).

Every neuron is a node and every weight an edge; a layout, built from the network's config alone,
maps each entry of each state-dict tensor to one slot of one node or edge feature, so
`to_state(to_graph(state)) == state` bit for bit. A graph is a torch_geometric `Data`:

    x          [N, Dn]  node features; unused slots 0
    edge_index [2, E]   source -> target neuron (the direction the signal flows)
    edge_attr  [E, De]  edge features, De = K*K for the network's largest kernel K: a k x k kernel sits
                        centred in the K x K grid (so a 1x1 conv or a linear weight is the centre slot)
    node_type  [N]      index into NODE_TYPES;  edge_type [E]: index into EDGE_TYPES
    node_mask  [N, Dn]  True at the slots that hold trainable parameters (what a metanetwork may change)
    edge_mask  [E, De]  same for edges; structural edges (residual identities, head membership) hold a
                        constant 1 and are False here

ResNet (K = 3, Dn = 4)
    input       C_in nodes, no features
    stem        conv output channels; slots 0-3: BatchNorm weight, bias, running_mean, running_var
    inner       each block's conv1 output channels; slots 0-3: bn1
    block_out   each block's output channels (conv2 + bn2, + shortcut); slots 0-3: bn2
    projection  a projecting block's 1x1 shortcut conv outputs; slots 0-3: its BatchNorm
    class_out   logits; slot 0: classifier bias
    edges: conv (stem, conv1, conv2; 9 slots), projection (1x1: centre slot), residual (block input ->
    block_out, or projection -> block_out), classifier (last block_out -> class_out)

ViT (K = patch, Dn = 4 + T for T tokens)
    input       C_in nodes
    embed       hidden units after the embedding; slot 0 patch-conv bias, 1-2 layer 0's layernorm_before
                weight and bias, 3 CLS token, 4..4+T-1 position embedding of each token
    query, key, value   each layer's q/k/v output dims (heads x head_dim); slot 0: bias
    head        one per head, no features; head edges tie its q, k and v dims to it
    attn_out    hidden units after the attention residual; slot 0 o_proj bias, 1-2 layernorm_after
    mlp_hidden  fc1 outputs; slot 0: fc1 bias
    mlp_out     hidden units after the MLP residual; slot 0 fc2 bias, 1-2 the next layer's
                layernorm_before (the final layernorm after the last layer)
    class_out   logits; slot 0: classifier bias
    edges: patch (input -> embed, K*K slots), query/key/value (stream -> q/k/v), out_proj (value ->
    attn_out: attention mixes tokens, not dims, so v dim j feeds o_proj's input j), residual (stream ->
    attn_out, attn_out -> mlp_out), fc1, fc2, classifier, head

BatchNorm's `num_batches_tracked` counters are the only state not in the graph (they change no output).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch_geometric.data import Data

from tyrsearch.meta.nets import NetConfig, ResNetConfig, ViTNetConfig, build

NODE_TYPES = ("input", "stem", "inner", "block_out", "projection", "class_out",
              "embed", "query", "key", "value", "head", "attn_out", "mlp_hidden", "mlp_out")
EDGE_TYPES = ("conv", "projection", "residual", "classifier",
              "patch", "query", "key", "value", "head", "out_proj", "fc1", "fc2")
BIAS, NORM = 0, 1  # ViT slots: the producing layer's bias; a LayerNorm's weight (NORM) and bias (NORM + 1)
CLS, POSITIONS = 3, 4
NOT_IN_GRAPH = "num_batches_tracked"


@dataclass(frozen=True)
class Entry:
    on_edges: bool
    index: torch.Tensor  # shaped like the tensor: flat positions into x or edge_attr
    trainable: bool


@dataclass(frozen=True)
class GraphLayout:
    node_dim: int
    edge_dim: int
    edge_index: torch.Tensor  # [2, E]
    node_type: torch.Tensor  # [N]
    edge_type: torch.Tensor  # [E]
    structural: torch.Tensor  # flat positions in edge_attr that hold a constant 1
    entries: dict[str, Entry]

    @property
    def num_nodes(self) -> int:
        return len(self.node_type)

    @property
    def num_edges(self) -> int:
        return len(self.edge_type)

    def to_graph(self, state: Mapping[str, torch.Tensor]) -> Data:
        """The graph of a state dict (its dtype: the first floating tensor's)."""
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        x = torch.zeros(self.num_nodes * self.node_dim, dtype=dtype)
        edge_attr = torch.zeros(self.num_edges * self.edge_dim, dtype=dtype)
        node_mask, edge_mask = torch.zeros_like(x, dtype=torch.bool), torch.zeros_like(edge_attr, dtype=torch.bool)
        for name, entry in self.entries.items():
            values, mask = (edge_attr, edge_mask) if entry.on_edges else (x, node_mask)
            values[entry.index.flatten()] = state[name].detach().flatten().to(dtype)
            mask[entry.index.flatten()] = entry.trainable
        edge_attr[self.structural] = 1
        return Data(x=x.view(-1, self.node_dim), edge_index=self.edge_index,
                    edge_attr=edge_attr.view(-1, self.edge_dim), node_type=self.node_type,
                    edge_type=self.edge_type, node_mask=node_mask.view(-1, self.node_dim),
                    edge_mask=edge_mask.view(-1, self.edge_dim))

    def to_state(self, x: torch.Tensor, edge_attr: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state dict of node features [N, Dn] and edge features [E, De] (differentiable)."""
        flat_x, flat_edges = x.reshape(-1), edge_attr.reshape(-1)
        return {name: (flat_edges if entry.on_edges else flat_x)[entry.index] for name, entry in self.entries.items()}


class _Builder:
    """Collects nodes, edges and where each tensor entry goes, in the order the network computes."""

    def __init__(self, *, kernel: int) -> None:
        self.kernel = kernel
        self.node_types: list[torch.Tensor] = []
        self.edges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (src, dst, type) chunks
        self.num_nodes = self.num_edges = 0
        self.node_entries: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}  # (node ids, slots, trainable)
        self.edge_entries: dict[str, torch.Tensor] = {}  # flat positions, De known upfront
        self.structural: list[torch.Tensor] = []

    def nodes(self, count: int, kind: str) -> torch.Tensor:
        ids = torch.arange(self.num_nodes, self.num_nodes + count)
        self.node_types.append(torch.full((count,), NODE_TYPES.index(kind)))
        self.num_nodes += count
        return ids

    def node_param(self, name: str, ids: torch.Tensor, slots: torch.Tensor | int, *, trainable: bool = True) -> None:
        """Entries of `name` at node `ids` and feature `slots` (broadcast together to the tensor's shape)."""
        ids, slots = torch.broadcast_tensors(ids, torch.as_tensor(slots))
        self.node_entries[name] = (ids, slots, trainable)

    def norm(self, prefix: str, ids: torch.Tensor, first_slot: int, *, running: bool = False) -> None:
        fields = ("weight", "bias", "running_mean", "running_var") if running else ("weight", "bias")
        for offset, field in enumerate(fields):
            self.node_param(f"{prefix}.{field}", ids, first_slot + offset, trainable=not field.startswith("running"))

    def _edges(self, src: torch.Tensor, dst: torch.Tensor, kind: str) -> torch.Tensor:
        ids = torch.arange(self.num_edges, self.num_edges + len(src))
        self.edges.append((src, dst, torch.full((len(src),), EDGE_TYPES.index(kind))))
        self.num_edges += len(src)
        return ids

    def weight(self, name: str, src: torch.Tensor, dst: torch.Tensor, kind: str, *, kernel: int | None = None) -> None:
        """A weight [O, I] (linear) or [O, I, k, k] (conv, k = `kernel`): one edge src[i] -> dst[o] per (o, i)."""
        ids = self._edges(src.repeat(len(dst)), dst.repeat_interleave(len(src)), kind).view(len(dst), len(src))
        k, offset = kernel or 1, (self.kernel - (kernel or 1)) // 2
        grid = torch.arange(offset, offset + k)
        slots = grid[:, None] * self.kernel + grid[None, :]  # [k, k] centred in the K x K grid
        index = ids[:, :, None, None] * self.kernel ** 2 + slots  # [O, I, k, k]
        self.edge_entries[name] = index if kernel else index[:, :, 0, 0]

    def link(self, src: torch.Tensor, dst: torch.Tensor, kind: str) -> None:
        """Structural edges src[i] -> dst[i] with a constant 1 in the centre slot (an identity connection)."""
        centre = (self.kernel // 2) * (self.kernel + 1)
        self.structural.append(self._edges(src, dst, kind) * self.kernel ** 2 + centre)

    def layout(self) -> GraphLayout:
        node_dim = 1 + max(int(slots.max()) for _, slots, _ in self.node_entries.values())
        entries = {name: Entry(False, ids * node_dim + slots, trainable)
                   for name, (ids, slots, trainable) in self.node_entries.items()}
        entries |= {name: Entry(True, index, True) for name, index in self.edge_entries.items()}
        src, dst, kinds = (torch.cat(parts) for parts in zip(*self.edges, strict=True))
        return GraphLayout(node_dim=node_dim, edge_dim=self.kernel ** 2, edge_index=torch.stack([src, dst]),
                           node_type=torch.cat(self.node_types), edge_type=kinds,
                           structural=torch.cat(self.structural), entries=entries)


def _resnet(config: ResNetConfig) -> GraphLayout:
    g = _Builder(kernel=3)
    inputs = g.nodes(config.in_channels, "input")
    stream = g.nodes(config.widths[0], "stem")
    g.weight("stem.weight", inputs, stream, "conv", kernel=3)
    g.norm("stem_bn", stream, 0, running=True)
    for b in range(config.num_blocks):
        block = f"blocks.{b}"
        inner = g.nodes(config.inner[b], "inner")
        g.weight(f"{block}.conv1.weight", stream, inner, "conv", kernel=3)
        g.norm(f"{block}.bn1", inner, 0, running=True)
        out = g.nodes(config.widths[config.stage(b)], "block_out")
        g.weight(f"{block}.conv2.weight", inner, out, "conv", kernel=3)
        g.norm(f"{block}.bn2", out, 0, running=True)
        if config.projects(b):
            projection = g.nodes(len(out), "projection")
            g.weight(f"{block}.proj.weight", stream, projection, "projection", kernel=1)
            g.norm(f"{block}.proj_bn", projection, 0, running=True)
            g.link(projection, out, "residual")
        else:
            g.link(stream, out, "residual")
        stream = out
    classes = g.nodes(config.classes, "class_out")
    g.weight("head.weight", stream, classes, "classifier")
    g.node_param("head.bias", classes, 0)
    return g.layout()


def _vit(config: ViTNetConfig) -> GraphLayout:
    g = _Builder(kernel=config.patch)
    embed = "vit.embeddings"
    inputs = g.nodes(config.in_channels, "input")
    stream = g.nodes(config.hidden, "embed")
    g.weight(f"{embed}.patch_embeddings.projection.weight", inputs, stream, "patch", kernel=config.patch)
    g.node_param(f"{embed}.patch_embeddings.projection.bias", stream, BIAS)
    g.node_param(f"{embed}.cls_token", stream[None, None, :], CLS)  # [1, 1, H]
    g.node_param(f"{embed}.position_embeddings", stream[None, None, :],
                 POSITIONS + torch.arange(config.tokens)[None, :, None])  # [1, T, H]
    for layer, (heads, channels) in enumerate(zip(config.layer_heads, config.layer_mlp, strict=True)):
        prefix = f"vit.layers.{layer}"
        g.norm(f"{prefix}.layernorm_before", stream, NORM)
        hubs = g.nodes(heads, "head").repeat_interleave(config.head_dim)  # [heads * head_dim]
        dims = {}
        for proj, kind in (("q", "query"), ("k", "key"), ("v", "value")):
            dims[proj] = g.nodes(heads * config.head_dim, kind)
            g.weight(f"{prefix}.attention.{proj}_proj.weight", stream, dims[proj], kind)
            g.node_param(f"{prefix}.attention.{proj}_proj.bias", dims[proj], BIAS)
            g.link(dims[proj], hubs, "head")
        attended = g.nodes(config.hidden, "attn_out")
        g.weight(f"{prefix}.attention.o_proj.weight", dims["v"], attended, "out_proj")
        g.node_param(f"{prefix}.attention.o_proj.bias", attended, BIAS)
        g.link(stream, attended, "residual")
        g.norm(f"{prefix}.layernorm_after", attended, NORM)
        hidden = g.nodes(channels, "mlp_hidden")
        g.weight(f"{prefix}.mlp.fc1.weight", attended, hidden, "fc1")
        g.node_param(f"{prefix}.mlp.fc1.bias", hidden, BIAS)
        stream = g.nodes(config.hidden, "mlp_out")
        g.weight(f"{prefix}.mlp.fc2.weight", hidden, stream, "fc2")
        g.node_param(f"{prefix}.mlp.fc2.bias", stream, BIAS)
        g.link(attended, stream, "residual")
    g.norm("vit.layernorm", stream, NORM)
    classes = g.nodes(config.classes, "class_out")
    g.weight("classifier.weight", stream, classes, "classifier")
    g.node_param("classifier.bias", classes, BIAS)
    return g.layout()


def layout_for(config: NetConfig) -> GraphLayout:
    return _resnet(config) if isinstance(config, ResNetConfig) else _vit(config)


def network_to_graph(model: nn.Module, config: NetConfig) -> tuple[Data, GraphLayout]:
    layout = layout_for(config)
    return layout.to_graph(model.state_dict()), layout


def graph_to_network(graph: Data, config: NetConfig) -> nn.Module:
    """A network of `config` (eval mode) with the weights of `graph`."""
    state = layout_for(config).to_state(graph.x, graph.edge_attr)
    model = build(config).to(graph.x.dtype)
    missing, unexpected = model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=False)
    if unexpected or any(not name.endswith(NOT_IN_GRAPH) for name in missing):
        raise ValueError(f"graph layout and network disagree: missing {missing}, unexpected {unexpected}")
    return model.eval()

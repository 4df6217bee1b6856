"""Network <-> graph conversion of the meta-pruner: exact both ways for ResNets and ViTs, every
parameter in exactly one slot, and the documented layout (node / edge kinds, feature sizes)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import CONFIGS, random_network
from tyrsearch.meta.graph import EDGE_TYPES, NODE_TYPES, graph_to_network, layout_for, network_to_graph
from tyrsearch.meta.nets import build, flops, logits


@pytest.fixture(params=sorted(CONFIGS))
def config(request):
    return CONFIGS[request.param]


def test_round_trip_gives_identical_outputs(config):
    model = random_network(config)
    graph, _ = network_to_graph(model, config)
    rebuilt = graph_to_network(graph, config)
    images = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    assert torch.equal(logits(model, images), logits(rebuilt, images))
    original, back = model.state_dict(), rebuilt.state_dict()
    assert all(torch.equal(original[k], back[k]) for k in original if not k.endswith("num_batches_tracked"))


def test_every_entry_has_its_own_slot_and_masks_cover_the_parameters(config):
    model = random_network(config)
    graph, layout = network_to_graph(model, config)
    flat = torch.cat([e.index.flatten() + (graph.x.numel() if e.on_edges else 0) for e in layout.entries.values()])
    assert flat.unique().numel() == flat.numel()
    trainable = int(graph.node_mask.sum() + graph.edge_mask.sum())
    assert trainable == sum(p.numel() for p in model.parameters())
    # structural edges (residual identities, head membership) hold a constant 1 and are never trainable
    structural = torch.zeros(graph.edge_attr.numel(), dtype=torch.bool)
    structural[layout.structural] = True
    assert not (graph.edge_mask.flatten() & structural).any()
    assert (graph.edge_attr.flatten()[structural] == 1).all()


def test_resnet_layout_matches_its_documentation():
    config = CONFIGS["resnet"]
    graph, layout = network_to_graph(random_network(config), config)
    assert (layout.node_dim, layout.edge_dim) == (4, 9)
    kinds = torch.bincount(graph.node_type, minlength=len(NODE_TYPES))
    count = dict(zip(NODE_TYPES, kinds.tolist(), strict=True))
    assert count["inner"] == sum(config.inner)
    assert count["block_out"] == sum(config.widths[config.stage(b)] for b in range(config.num_blocks))
    assert count["projection"] == sum(config.widths[1:])  # one projecting block per stage after the first
    # a 3x3 conv edge fills all 9 slots, a 1x1 projection only the centre
    conv = graph.edge_type == EDGE_TYPES.index("conv")
    projection = graph.edge_type == EDGE_TYPES.index("projection")
    assert (graph.edge_attr[conv] != 0).all()
    assert (graph.edge_attr[projection][:, [0, 1, 2, 3, 5, 6, 7, 8]] == 0).all()
    residual = graph.edge_type == EDGE_TYPES.index("residual")
    assert int(residual.sum()) == sum(config.widths[config.stage(b)] for b in range(config.num_blocks))


def test_vit_layout_matches_its_documentation():
    config = CONFIGS["vit"]
    graph, layout = network_to_graph(random_network(config), config)
    assert (layout.node_dim, layout.edge_dim) == (4 + config.tokens, config.patch ** 2)
    count = dict(zip(NODE_TYPES, torch.bincount(graph.node_type, minlength=len(NODE_TYPES)).tolist(), strict=True))
    assert count["head"] == sum(config.layer_heads)
    assert count["query"] == count["key"] == count["value"] == sum(config.layer_heads) * config.head_dim
    assert count["mlp_hidden"] == sum(config.layer_mlp)
    head_edges = graph.edge_index[:, graph.edge_type == EDGE_TYPES.index("head")]
    assert torch.bincount(head_edges[1]).max() == 3 * config.head_dim  # each head: its q, k and v dims
    # position embeddings are node features of the embedding's hidden units
    state = random_network(config).state_dict()
    embed = graph.x[graph.node_type == NODE_TYPES.index("embed")]
    assert torch.equal(embed[:, 4:], state["vit.embeddings.position_embeddings"][0].T)


def test_flops_match_torch_flop_counter(config):
    model = build(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        logits(model, torch.zeros(1, 1, 28, 28))
    assert counter.get_total_flops() == flops(config)


def test_layout_depends_on_the_config_only():
    config = CONFIGS["vit"]
    first, second = layout_for(config), layout_for(config)
    assert torch.equal(first.edge_index, second.edge_index)
    assert first.entries.keys() == second.entries.keys()

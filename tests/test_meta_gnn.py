"""The metanetwork: its output has the input network's shapes, it starts as the identity, it changes only
trainable slots, and the meta-training loss reaches it through torch.func.functional_call."""

import pytest
import torch

from tests.conftest import CONFIGS
from tyrsearch.meta.gnn import MetaNet, MetaNetConfig, rewrite
from tyrsearch.meta.graph import layout_for, network_to_graph
from tyrsearch.meta.nets import build, logits
from tyrsearch.meta.train import Member, losses

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest


@pytest.fixture(params=sorted(CONFIGS))
def case(request):
    config = CONFIGS[request.param]
    torch.manual_seed(0)
    model = build(config).eval()
    layout = layout_for(config)
    metanet = MetaNet(config=MetaNetConfig(node_dim=layout.node_dim, edge_dim=layout.edge_dim, hidden=8, layers=2))
    return config, model, metanet


def perturb_decoders(metanet: MetaNet) -> None:
    """Give the zero-initialised output layers weights, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for decoder in (metanet.node_out, metanet.edge_out):
            decoder[-1].weight.normal_(std=0.1)
            decoder[-1].bias.normal_(std=0.1)


def test_output_has_the_input_networks_shapes(case):
    config, model, metanet = case
    perturb_decoders(metanet)
    graph, layout = network_to_graph(model, config)
    x, edge_attr = metanet(graph)
    assert x.shape == graph.x.shape and edge_attr.shape == graph.edge_attr.shape
    state = layout.to_state(x, edge_attr)
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    rewritten = rewrite(metanet, model, config)
    assert {k: v.shape for k, v in rewritten.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    assert logits(rewritten, torch.randn(2, 1, 28, 28)).shape == (2, config.classes)


def test_untrained_metanetwork_returns_the_network_unchanged(case):
    config, model, metanet = case
    rewritten = rewrite(metanet, model, config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rewritten.state_dict().values(),
                                                 strict=True))


def test_only_trainable_slots_change(case):
    config, model, metanet = case
    perturb_decoders(metanet)
    graph, _ = network_to_graph(model, config)
    with torch.no_grad():
        x, edge_attr = metanet(graph)
    assert torch.equal(x[~graph.node_mask], graph.x[~graph.node_mask])  # padding, BatchNorm statistics
    assert torch.equal(edge_attr[~graph.edge_mask], graph.edge_attr[~graph.edge_mask])  # padding, structural
    assert not torch.equal(x[graph.node_mask], graph.x[graph.node_mask])
    assert not torch.equal(edge_attr[graph.edge_mask], graph.edge_attr[graph.edge_mask])
    rewritten = rewrite(metanet, model, config)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, rewritten.get_buffer(name))


def test_training_loss_reaches_every_part_of_the_metanetwork(case):
    config, model, metanet = case
    perturb_decoders(metanet)
    member = Member.of("net", model, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ce, sparsity = losses(metanet, member, images, labels)
    (ce + sparsity).backward()
    for name, param in metanet.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert metanet.node_in.weight.grad.abs().sum() > 0 and metanet.layers[0].edge_parts.weight.grad.abs().sum() > 0
    # the zoo network itself (weights and BatchNorm statistics) is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sparsity_term_is_one_for_the_unchanged_network(case):
    config, model, metanet = case
    member = Member.of("net", model, config)
    _, sparsity = losses(metanet, member, torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    assert sparsity.item() == pytest.approx(1.0, rel=1e-5)

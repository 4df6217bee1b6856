"""Structural pruning of the meta-pruner's networks: the FLOPs of the pruned network (counted by torch)
meet the speedup, a cut removes every coupled slice (removing a dead unit changes no output), group-L2
ranks dead units first, and impossible speedups are one-line errors."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import CONFIGS, random_network
from tyrsearch.errors import UserError
from tyrsearch.meta.groups import groups_for
from tyrsearch.meta.nets import ResNetConfig, ViTNetConfig, build, logits
from tyrsearch.meta.prune import max_speedup, prune_to_speedup, unit_scores

NETWORKS = {"resnet": ResNetConfig(widths=(8, 16, 32)), "vit": ViTNetConfig(hidden=32, heads=4, mlp=64, layers=4)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest


def counted_flops(model) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        logits(model, torch.zeros(1, 1, 28, 28, dtype=next(model.parameters()).dtype))
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", sorted(NETWORKS))
@pytest.mark.parametrize("method", ["l2", "random"])
@pytest.mark.parametrize("speedup", [2.0, 3.0])
def test_pruned_flops_meet_the_speedup(arch, method, speedup):
    config = NETWORKS[arch]
    torch.manual_seed(0)
    model = build(config).eval()
    pruned, pruned_config = prune_to_speedup(model, config, unit_scores(model, config, method=method), speedup=speedup)
    achieved = counted_flops(model) / counted_flops(pruned)
    assert speedup <= achieved < speedup * 1.1  # met, by removing units one at a time (no gross overshoot)
    assert logits(pruned, torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert all(getattr(pruned_config, g.field)[g.index] >= 1 for g in groups_for(config))


def kill(model, config, group_name: str, unit: int) -> None:
    """Zero what a unit writes, so that it contributes nothing (its readers may stay non-zero)."""
    state = model.state_dict()
    with torch.no_grad():
        if isinstance(config, ViTNetConfig):
            kind, layer = group_name.split(".")
            prefix = f"vit.layers.{layer}"
            if kind == "layer_heads":  # zero values: the head's output is then 0 whatever it attends to
                rows = slice(unit * config.head_dim, (unit + 1) * config.head_dim)
                state[f"{prefix}.attention.v_proj.weight"][rows] = 0
                state[f"{prefix}.attention.v_proj.bias"][rows] = 0
            else:  # GELU(0) = 0
                state[f"{prefix}.mlp.fc1.weight"][unit] = 0
                state[f"{prefix}.mlp.fc1.bias"][unit] = 0
        else:
            group = next(g for g in groups_for(config) if g.name == group_name)
            for piece in group.slices:  # a BatchNorm with weight and bias 0 outputs 0 (ReLU(0) = 0 after it)
                if piece.name.endswith(("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "bn.weight", "bn.bias")):
                    state[piece.name][unit] = 0


DEAD_UNITS = [("resnet", "inner.3", 4), ("resnet", "widths.0", 1), ("resnet", "widths.1", 4),
              ("resnet", "widths.2", 0), ("vit", "layer_heads.1", 2), ("vit", "layer_mlp.0", 5)]


@pytest.mark.parametrize(("arch", "group_name", "unit"), DEAD_UNITS)
def test_removing_a_dead_unit_changes_no_output(arch, group_name, unit):
    config = CONFIGS[arch]
    model = random_network(config)
    kill(model, config, group_name, unit)
    scores = {g.name: torch.ones(g.size) for g in groups_for(config)}
    scores[group_name][unit] = 0  # this unit goes first; the tiny speedup takes exactly one unit
    pruned, pruned_config = prune_to_speedup(model, config, scores, speedup=1.0001)
    field, index = group_name.split(".")
    assert getattr(pruned_config, field)[int(index)] == getattr(config, field)[int(index)] - 1
    images = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(logits(pruned, images), logits(model, images), rtol=1e-9, atol=1e-9)


def test_group_l2_ranks_a_zeroed_unit_first():
    config = CONFIGS["vit"]
    model = random_network(config)
    with torch.no_grad():  # every scored slice of MLP channel 2 in layer 1
        for name, rows in (("fc1.weight", 2), ("fc1.bias", 2)):
            model.get_parameter(f"vit.layers.1.mlp.{name}")[rows] = 0
        model.get_parameter("vit.layers.1.mlp.fc2.weight")[:, 2] = 0
    scores = unit_scores(model, config, method="l2")
    assert scores["layer_mlp.1"].argmin() == 2 and scores["layer_mlp.1"][2] == pytest.approx(0, abs=1e-6)
    assert all(s.mean().item() == pytest.approx(1.0) for s in scores.values())  # normalised within each group


def test_random_scores_follow_the_seed():
    config = NETWORKS["resnet"]
    model = build(config)
    first, again, other = (unit_scores(model, config, method="random", seed=s) for s in (3, 3, 4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_unreachable_speedup_is_a_user_error():
    config = NETWORKS["vit"]
    model = build(config)
    with pytest.raises(UserError, match="out of reach"):
        prune_to_speedup(model, config, unit_scores(model, config, method="l2"), speedup=max_speedup(config) * 1.01)

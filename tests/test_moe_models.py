"""Mixture-of-Experts families on tiny random models: routed experts as a unit, cut, saved and reloaded."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

from tests.conftest import (
    COMMON,
    MOE_FAMILIES,
    MOE_HIDDEN,
    reload_without_tyrsearch,
    remove_experts,
    tiny_llama,
    tiny_mixtral,
    tiny_olmoe,
    tiny_qwen2_moe,
)
from tyrsearch.allocation import Dims
from tyrsearch.errors import UserError
from tyrsearch.local import make_criterion
from tyrsearch.materialize import save_pruned
from tyrsearch.models import EXPERTS, KV_GROUPS, MLP, Q_HEADS, KeptUnits, LayerShape, adapter_for
from tyrsearch.pruner import prune

HEAD_DIM = MOE_HIDDEN // COMMON["num_attention_heads"]
# experts kept per MoE layer: a different count in every layer
KEEP = {
    "mixtral": {0: [1, 3, 4], 1: [0, 5]},
    "qwen2_moe": {0: [0, 2, 3, 6, 7], 2: [1, 4]},
    "olmoe": {0: [2, 5], 1: [0, 1, 3, 4, 7]},
}


class NeverRoute(TorchFunctionMode):
    """Adds -inf to the router logits of the removed experts, so the dense model never routes to them."""

    def __init__(self, model, keep: dict[int, list[int]]):
        super().__init__()
        self.masks = {}
        for idx, kept in keep.items():
            router = model.model.layers[idx].mlp.gate.weight
            mask = torch.full((router.shape[0],), float("-inf"))
            mask[kept] = 0.0
            self.masks[id(router)] = mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and id(args[1]) in self.masks:  # every family's router: F.linear(x, gate.weight)
            out = out + self.masks[id(args[1])]
        return out


def test_adapters_find_experts_and_attention_units():
    mixtral, qwen, olmoe = tiny_mixtral(), tiny_qwen2_moe(), tiny_olmoe()
    assert adapter_for(mixtral).shapes(mixtral) == [LayerShape(kv_heads=2, q_per_kv=2, intermediate=32, experts=6)] * 2
    assert adapter_for(qwen).shapes(qwen) == [
        LayerShape(kv_heads=2, q_per_kv=2, intermediate=32, experts=8),
        LayerShape(kv_heads=2, q_per_kv=2, intermediate=80),  # the dense MLP layer
        LayerShape(kv_heads=2, q_per_kv=2, intermediate=32, experts=8),
    ]
    assert adapter_for(olmoe).shapes(olmoe) == [LayerShape(kv_heads=4, q_per_kv=1, intermediate=32, experts=8)] * 2
    assert adapter_for(mixtral).unit_types == adapter_for(qwen).unit_types == (KV_GROUPS, Q_HEADS, EXPERTS)
    assert adapter_for(olmoe).unit_types == (EXPERTS,)
    assert "q_norm" in adapter_for(olmoe).not_prunable[Q_HEADS]
    assert all(MLP in adapter_for(m).not_prunable for m in (mixtral, qwen, olmoe))
    assert all(adapter_for(m).head_dim(m) == HEAD_DIM for m in (mixtral, qwen, olmoe))


def test_block_config_names_experts_only_in_moe_layers():
    dense = LayerShape(kv_heads=2, q_per_kv=3, intermediate=64)
    assert set(dense.block_config()) == {"num_attention_heads", "num_key_value_heads", "intermediate_size",
                                         "o_proj_bias", "down_proj_bias"}  # saved dense configs are unchanged
    moe = dense.with_units(EXPERTS, 5)
    assert moe.units(EXPERTS) == 5 and moe.block_config()["num_experts"] == 5
    assert moe.with_units(MLP, 16) == LayerShape(kv_heads=2, q_per_kv=3, intermediate=16, experts=5)


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_removing_experts_equals_never_routing_to_them(name, tokens):
    # in float64 the two agree to the router's rounding: every family takes the routing softmax in float32
    # whatever the model's dtype, and a softmax over all logits (some at -inf) and one over the kept ones
    # sum in an order each CPU's kernel picks (~4e-7 apart on CI); removing experts moves logits by >1e-3.
    # The default grouped_mm experts kernel has no float64, the eager loop does
    model = MOE_FAMILIES[name]().double()
    model.set_experts_implementation("eager")
    keep = KEEP[name]
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(tokens).logits
        with NeverRoute(model, keep):
            reference = model(tokens).logits
        remove_experts(model, keep)
        pruned = model(tokens).logits
    torch.testing.assert_close(pruned, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(pruned, dense, atol=1e-3)  # the removed experts did matter
    for idx, kept in keep.items():
        moe = model.model.layers[idx].mlp
        prefix = f"model.layers.{idx}.mlp."
        assert torch.equal(moe.gate.weight, dense_state[prefix + "gate.weight"][kept])
        assert torch.equal(moe.experts.gate_up_proj, dense_state[prefix + "experts.gate_up_proj"][kept])
        assert torch.equal(moe.experts.down_proj, dense_state[prefix + "experts.down_proj"][kept])
        assert moe.gate.num_experts == moe.experts.num_experts == len(kept)


def test_qwen2_moe_shared_expert_is_untouched(tokens):
    model = tiny_qwen2_moe()
    shared = {k: v.clone() for k, v in model.state_dict().items() if ".shared_expert" in k}
    remove_experts(model, KEEP["qwen2_moe"])
    after = {k: v for k, v in model.state_dict().items() if ".shared_expert" in k}
    assert shared.keys() == after.keys() and len(shared) == 2 * 4  # 2 MoE layers: gate/up/down + its gate
    assert all(torch.equal(shared[k], after[k]) for k in shared)


def test_keeping_fewer_experts_than_top_k_is_refused():
    model = tiny_mixtral()
    layer = model.model.layers[0]
    with pytest.raises(UserError, match="cannot keep 1 experts.*keep at least 2"):
        adapter_for(model).prune_layer_(layer, EXPERTS, KeptUnits(kept=torch.tensor([3])), layer_idx=0,
                                        head_dim=HEAD_DIM)
    assert adapter_for(model).shape(layer).experts == 6  # nothing was cut
    # a state-dict slice cannot see top-k, but it never returns experts == 0, the mark of a dense MLP
    with pytest.raises(ValueError, match="at least one expert"):
        adapter_for(model).slice(layer.state_dict(), adapter_for(model).shape(layer), EXPERTS,
                                 KeptUnits(kept=torch.zeros(0, dtype=torch.long)), head_dim=HEAD_DIM)


def test_unknown_units_still_raise():
    qwen = tiny_qwen2_moe()
    adapter, state = adapter_for(qwen), qwen.model.layers[0].state_dict()
    shape = adapter.shape(qwen.model.layers[0])
    with pytest.raises(ValueError, match="unknown unit type 'heads'"):
        adapter.slice(state, shape, "heads", KeptUnits(kept=torch.tensor([0])), head_dim=HEAD_DIM)
    dense_layer = qwen.model.layers[1]
    with pytest.raises(ValueError, match="dense MLP"):
        adapter.group(dense_layer.state_dict(), adapter.shape(dense_layer), EXPERTS, head_dim=HEAD_DIM)
    llama = tiny_llama()
    layer = llama.model.layers[0]
    with pytest.raises(ValueError, match="unknown unit type 'experts'"):
        adapter_for(llama).group(layer.state_dict(), adapter_for(llama).shape(layer), EXPERTS, head_dim=8)


def test_magnitude_criterion_keeps_the_largest_experts(tokens):
    """The experts view (router row + gate_up as producers, down as consumer) works with the criteria."""
    model = tiny_mixtral()
    moe = model.model.layers[1].mlp
    norms = (moe.gate.weight.double().pow(2).sum(1) + moe.experts.gate_up_proj.double().pow(2).sum((1, 2))
             + moe.experts.down_proj.double().pow(2).sum((1, 2)))
    expected = norms.topk(4).indices.sort().values
    router = moe.gate.weight.detach().clone()
    plan = adapter_for(model).shapes(model)
    plan[1] = plan[1].with_units(EXPERTS, 4)
    prune(model, plan, make_criterion("magnitude"), tokens, progress=False)
    assert adapter_for(model).shapes(model) == plan
    assert torch.equal(model.model.layers[1].mlp.gate.weight, router[expected])


def _counted_params(layer) -> int:
    """Parameters that sparsity counts: projections, router and routed experts (no norms, biases, shared expert)."""
    return sum(p.numel() for n, p in layer.named_parameters()
               if "shared_expert" not in n and (n.endswith("proj.weight") or n == "mlp.gate.weight"
                                                or n.startswith("mlp.experts.")))


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_parameter_count_follows_the_experts(name):
    model = MOE_FAMILIES[name]()
    remove_experts(model, KEEP[name])
    adapter, dims = adapter_for(model), Dims(hidden=MOE_HIDDEN, head_dim=HEAD_DIM)
    for layer in adapter.layers(model):
        assert dims.params(adapter.shape(layer)) == _counted_params(layer)


def _pruned(name):
    """Experts removed (a different count per layer) and, where the family allows, a KV group cut."""
    model = MOE_FAMILIES[name]()
    remove_experts(model, KEEP[name])
    adapter = adapter_for(model)
    if KV_GROUPS in adapter.unit_types:
        adapter.prune_layer_(model.model.layers[0], KV_GROUPS, KeptUnits(kept=torch.tensor([1])), layer_idx=0,
                             head_dim=HEAD_DIM)
    return model


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_per_layer_expert_counts_save_and_reload(name, tokens, tmp_path):
    model = _pruned(name)
    before = model(tokens).logits
    folder = save_pruned(model, None, tmp_path / "pruned")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"tyr_{name}"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_tyr.Tyr")
    counts = [block.get("num_experts") for block in config["block_configs"]]
    keep = KEEP[name]
    assert counts == [len(keep[i]) if i in keep else None for i in range(model.config.num_hidden_layers)]
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded).__name__.startswith("Tyr")
    assert reloaded.config._experts_implementation == model.config._experts_implementation
    assert torch.equal(reloaded(tokens).logits, before)
    assert adapter_for(reloaded).shapes(reloaded) == adapter_for(model).shapes(model)


def test_trust_remote_code_loads_every_moe_family_without_tyrsearch(tokens, tmp_path):
    rows = reload_without_tyrsearch({name: _pruned(name) for name in MOE_FAMILIES}, tokens, tmp_path)
    # grouped_mm, the kernel the models were saved from: a reloaded class must not fall back to eager
    assert rows == [[name, "grouped_mm", "0.0"] for name in sorted(MOE_FAMILIES)]

"""Mixture-of-Experts families on tiny random models: routed experts as a unit, cut, saved and reloaded."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from tests.conftest import VOCAB, tiny_llama
from tyrsearch.allocation import Dims
from tyrsearch.errors import UserError
from tyrsearch.local import make_criterion
from tyrsearch.materialize import save_pruned
from tyrsearch.models import EXPERTS, KV_GROUPS, MLP, Q_HEADS, KeptUnits, LayerShape, adapter_for
from tyrsearch.pruner import prune

HIDDEN, HEAD_DIM = 64, 16
# a larger init than transformers' 0.02 so that routing and experts visibly change the logits
COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": 4, "initializer_range": 0.1}


def tiny_mixtral(*, vocab: int = VOCAB) -> MixtralForCausalLM:
    """Softmax over all experts, top-2, renormalised over the two."""
    torch.manual_seed(0)
    config = MixtralConfig(**{**COMMON, "vocab_size": vocab}, intermediate_size=32, num_hidden_layers=2,
                           num_key_value_heads=2,
                           num_local_experts=6, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


def tiny_qwen2_moe(*, vocab: int = VOCAB) -> Qwen2MoeForCausalLM:
    """A shared expert beside the routed ones, top-2 not renormalised, layer 1 a dense MLP."""
    torch.manual_seed(0)
    config = Qwen2MoeConfig(**{**COMMON, "vocab_size": vocab}, intermediate_size=80, moe_intermediate_size=32,
                            shared_expert_intermediate_size=48, num_hidden_layers=3, mlp_only_layers=[1],
                            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    return Qwen2MoeForCausalLM(config).eval()


def tiny_olmoe(*, vocab: int = VOCAB) -> OlmoeForCausalLM:
    """q_norm / k_norm over all heads, top-2 renormalised."""
    torch.manual_seed(0)
    config = OlmoeConfig(**{**COMMON, "vocab_size": vocab}, intermediate_size=32, num_hidden_layers=2, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=None)
    return OlmoeForCausalLM(config).eval()


MOE_FAMILIES = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "olmoe": tiny_olmoe}
# experts kept per MoE layer: a different count in every layer
KEEP = {
    "mixtral": {0: [1, 3, 4], 1: [0, 5]},
    "qwen2_moe": {0: [0, 2, 3, 6, 7], 2: [1, 4]},
    "olmoe": {0: [2, 5], 1: [0, 1, 3, 4, 7]},
}


def remove_experts(model, keep: dict[int, list[int]]) -> None:
    adapter = adapter_for(model)
    for idx, kept in keep.items():
        adapter.prune_layer_(adapter.layers(model)[idx], EXPERTS, KeptUnits(kept=torch.tensor(kept)),
                             layer_idx=idx, head_dim=adapter.head_dim(model))


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
    # in float64 the two agree bit for bit (float32 differs by reduction order, ~1e-6); the default
    # grouped_mm experts kernel has no float64, the eager loop does
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
    assert torch.equal(pruned, reference)
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
    adapter, dims = adapter_for(model), Dims(hidden=HIDDEN, head_dim=HEAD_DIM)
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


def reload_without_tyrsearch(models: dict, tokens: torch.Tensor, tmp_path) -> list[list[str]]:
    """Save each model, reload it with trust_remote_code in a fresh interpreter that never imports tyrsearch;
    returns [name, experts implementation, max |logit difference|] per model, in name order."""
    torch.save(tokens, tmp_path / "tokens.pt")
    folders = {}
    for name, model in sorted(models.items()):
        folders[name] = str(save_pruned(model, None, tmp_path / name))
        torch.save(model(tokens).logits, tmp_path / f"{name}.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
tokens = torch.load({str(tmp_path / 'tokens.pt')!r}, weights_only=True)
for name, folder in {folders!r}.items():
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
    expected = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=True)
    print(name, m.config._experts_implementation, float((m(tokens).logits - expected).abs().max()))
assert "tyrsearch" not in sys.modules, "tyrsearch was imported"
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return [line.split() for line in out.stdout.strip().splitlines()]


def test_trust_remote_code_loads_every_moe_family_without_tyrsearch(tokens, tmp_path):
    rows = reload_without_tyrsearch({name: _pruned(name) for name in MOE_FAMILIES}, tokens, tmp_path)
    # grouped_mm, the kernel the models were saved from: a reloaded class must not fall back to eager
    assert rows == [[name, "grouped_mm", "0.0"] for name in sorted(MOE_FAMILIES)]

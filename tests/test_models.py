"""Family adapters (structure), criteria (importance) and the one-shot pruner on tiny random models."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import tiny_gemma3, tiny_llama, tiny_qwen2
from tyrsearch.errors import UserError
from tyrsearch.local import CRITERIA, make_criterion, top_per_block
from tyrsearch.models import KV_GROUPS, MLP, Q_HEADS, KeptUnits, LayerShape, adapter_for
from tyrsearch.pruner import OneShotConfig, check_plan, one_shot, prune


def test_unit_discovery_per_family():
    llama, gemma, qwen = tiny_llama(), tiny_gemma3(), tiny_qwen2()
    assert adapter_for(llama).shapes(llama) == [LayerShape(kv_heads=2, q_per_kv=3, intermediate=64)] * 3
    assert adapter_for(gemma).shapes(gemma) == [LayerShape(kv_heads=1, q_per_kv=4, intermediate=64)] * 3
    assert adapter_for(qwen).shapes(qwen) == [LayerShape(kv_heads=3, q_per_kv=2, intermediate=64)] * 2
    assert adapter_for(llama).unit_types == (KV_GROUPS, Q_HEADS, MLP)
    assert adapter_for(gemma).unit_types == (Q_HEADS, MLP)
    assert "single KV head" in adapter_for(gemma).not_prunable[KV_GROUPS]


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2, gemma3_text"):
        adapter_for(gpt2)


def test_group_view_matches_weights():
    model = tiny_llama()
    adapter, layer = adapter_for(model), model.model.layers[0]
    shape = adapter.shape(layer)
    group = adapter.group(layer.state_dict(), shape, KV_GROUPS, head_dim=8)
    q, k, v = group.producers
    assert q.shape == (2, 3 * 8, 48) and k.shape == (2, 8, 48) and v.shape == (2, 8, 48)
    assert group.consumer.shape == (48, 2, 24)
    # group 1's query rows are q_proj rows 24..47 and its o_proj columns the same range
    assert torch.equal(q[1], layer.self_attn.q_proj.weight[24:48])
    assert torch.equal(group.consumer[:, 1], layer.self_attn.o_proj.weight[:, 24:48])
    heads = adapter.group(layer.state_dict(), shape, Q_HEADS, head_dim=8)
    assert heads.units == 6 and heads.blocks == 2 and heads.width == 8


def test_slicing_removes_exactly_the_coupled_weights(tokens):
    model = tiny_llama()
    adapter, layer = adapter_for(model), model.model.layers[0]
    dense_q = layer.self_attn.q_proj.weight.clone()
    dense_o = layer.self_attn.o_proj.weight.clone()
    dense_k = layer.self_attn.k_proj.weight.clone()
    shape = adapter.prune_layer_(layer, KV_GROUPS, KeptUnits(kept=torch.tensor([1])), layer_idx=0, head_dim=8)
    assert shape == LayerShape(kv_heads=1, q_per_kv=3, intermediate=64)
    assert torch.equal(layer.self_attn.q_proj.weight, dense_q[24:48])
    assert torch.equal(layer.self_attn.k_proj.weight, dense_k[8:16])
    assert torch.equal(layer.self_attn.o_proj.weight, dense_o[:, 24:48])
    assert model(tokens).logits.shape == (*tokens.shape, 96)


def test_query_heads_keep_the_gqa_ratio_uniform(tokens):
    model = tiny_llama()
    adapter, layer = adapter_for(model), model.model.layers[0]
    # keep heads 0, 2 of group 0 and heads 3, 4 of group 1
    shape = adapter.prune_layer_(layer, Q_HEADS, KeptUnits(kept=torch.tensor([0, 2, 3, 4])), layer_idx=0, head_dim=8)
    assert shape == LayerShape(kv_heads=2, q_per_kv=2, intermediate=64)
    assert layer.self_attn.num_key_value_groups == 2
    assert layer.self_attn.k_proj.out_features == 16  # KV heads untouched
    assert torch.isfinite(model(tokens).logits).all()


def test_top_per_block_keeps_the_same_count_in_every_block():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3])
    assert top_per_block(scores, blocks=2, keep=2).tolist() == [1, 2, 3, 5]
    assert top_per_block(scores, blocks=1, keep=2).tolist() == [1, 3]


@pytest.mark.parametrize("criterion", sorted(set(CRITERIA) - {"stun"}))  # stun: MoE experts only (test_moe_search)
def test_every_criterion_gives_a_valid_smaller_model(criterion, family, tokens):
    name, factory = family
    model = factory()
    adapter = adapter_for(model)
    dense = adapter.shapes(model)
    attention = {"llama": 0.4, "gemma3": 0.25, "qwen2": 0.5}[name]
    report = one_shot(model, OneShotConfig(criterion=criterion, sparsity=0.45, attention_sparsity=attention),
                      tokens, progress=False)
    shapes = adapter.shapes(model)
    assert all(s.intermediate < d.intermediate and s.q_heads < d.q_heads for s, d in zip(shapes, dense, strict=False))
    assert all(s.q_heads % s.kv_heads == 0 for s in shapes)
    assert abs(report["achieved_sparsity"] - 0.45) < 0.03
    logits = model(tokens).logits
    assert logits.shape == (*tokens.shape, 96) and torch.isfinite(logits).all()


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_pruning_nothing_is_the_identity(criterion, tokens):
    model = tiny_llama()
    before = model(tokens).logits
    one_shot(model, OneShotConfig(criterion=criterion, sparsity=0.0), tokens, progress=False)
    assert torch.equal(model(tokens).logits, before)


def test_osscar_refit_beats_plain_slicing_on_the_layer_output():
    """The least-squares refit must reproduce the dense consumer output better than dropping columns."""
    torch.manual_seed(0)
    x = torch.randn(2000, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64)  # correlated inputs
    weight = torch.randn(16, 32, dtype=torch.float64)
    from tyrsearch.models import UnitGroup

    group = UnitGroup(producers=(), consumer=weight.reshape(16, 32, 1), xtx=x.T @ x, x_sum=x.sum(0), tokens=2000)
    selection = make_criterion("osscar").select(group, 20)
    kept = selection.kept
    refit_err = (x[:, kept] @ selection.consumer.T - x @ weight.T).norm()
    sliced_err = (x[:, kept] @ weight[:, kept].T - x @ weight.T).norm()
    assert len(kept) == 20 and refit_err < 0.7 * sliced_err


def test_flap_bias_keeps_the_mean_output():
    torch.manual_seed(0)
    x = torch.randn(4000, 24, dtype=torch.float64) + 3.0  # inputs with a large mean
    weight = torch.randn(8, 24, dtype=torch.float64)
    from tyrsearch.models import UnitGroup

    group = UnitGroup(producers=(), consumer=weight.reshape(8, 24, 1), xtx=x.T @ x, x_sum=x.sum(0), tokens=4000)
    selection = make_criterion("flap").select(group, 12)
    pruned_mean = (x[:, selection.kept] @ weight[:, selection.kept].T).mean(0) + selection.bias_shift
    assert torch.allclose(pruned_mean, (x @ weight.T).mean(0), atol=1e-9)


def test_sequential_calibration_sees_pruned_inputs(tokens):
    """With sequential calibration, layer 1's statistics come from the pruned layer 0."""
    from tyrsearch.calibration import LayerInputs

    seen = {}
    for sequential in (True, False):
        model = tiny_llama()
        adapter = adapter_for(model)
        inputs = LayerInputs(model, adapter, tokens, batch_size=3)
        inputs.collect({})
        adapter.prune_layer_(model.model.layers[0], MLP, KeptUnits(kept=torch.arange(8)), layer_idx=0, head_dim=8)
        inputs.advance(recompute=sequential)
        seen[sequential] = torch.cat(inputs.hidden)
    dense = tiny_llama()
    with torch.no_grad():
        dense_hidden = dense(tokens, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(seen[False], dense_hidden, atol=1e-5)
    assert not torch.allclose(seen[True], dense_hidden, atol=1e-3)


def test_plans_that_cannot_be_cut_are_refused():
    gemma = tiny_gemma3()
    adapter = adapter_for(gemma)
    dense = adapter.shapes(gemma)
    bad = [s.with_units(KV_GROUPS, 0) for s in dense]
    with pytest.raises(UserError, match="kv_groups are not prunable"):
        check_plan(bad, dense, adapter)
    with pytest.raises(UserError, match="cannot keep 70 mlp"):
        check_plan([s.with_units(MLP, 70) for s in dense], dense, adapter)


def test_removing_a_whole_block_skips_it(tokens):
    model = tiny_llama()
    adapter = adapter_for(model)
    plan = adapter.shapes(model)
    plan[1] = LayerShape(kv_heads=0, q_per_kv=0, intermediate=0)
    prune(model, plan, make_criterion("magnitude"), tokens, progress=False)
    layer = model.model.layers[1]
    assert adapter.shape(layer) == LayerShape(kv_heads=0, q_per_kv=0, intermediate=0)
    assert not any(True for _ in layer.self_attn.parameters()) and not any(True for _ in layer.mlp.parameters())
    assert torch.isfinite(model(tokens).logits).all()


def test_osscar_levels_in_one_pass_equal_separate_selections():
    torch.manual_seed(0)
    x = torch.randn(3000, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    from tyrsearch.models import UnitGroup

    group = UnitGroup(producers=(), consumer=torch.randn(12, 40, 1, dtype=torch.float64), xtx=x.T @ x,
                      x_sum=x.sum(0), tokens=3000)
    osscar = make_criterion("osscar")
    together = osscar.select_many(group, [30, 20, 10])
    for keep in (30, 20, 10):
        alone = osscar.select(group, keep)
        assert torch.equal(together[keep].kept, alone.kept) and torch.allclose(together[keep].consumer, alone.consumer)
    assert set(together[10].kept.tolist()) < set(together[20].kept.tolist()) < set(together[30].kept.tolist())

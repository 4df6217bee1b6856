"""STUN on tiny random Mixtral / Qwen2-MoE / OLMoE models: co-selection counts, complete-linkage clustering
and the threshold bisection, representatives and merging, the baselines, the unstructured stage's total
sparsity and 2:4 pattern, one calibration pass, save -> reload, the CLI's errors and the ONNX export."""

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from tests.conftest import (
    COMMON,
    MOE_FAMILIES,
    reload_without_tyrsearch,
    remove_experts,
    run_cli,
    tiny_llama,
    tiny_mixtral,
)
from tyrsearch.errors import ParameterError, UserError
from tyrsearch.materialize import save_pruned
from tyrsearch.models import adapter_for
from tyrsearch.moe import stats as calibration
from tyrsearch.moe.experts import (
    ExpertLayer,
    StunExperts,
    complete_linkage,
    expert_distance,
    global_threshold,
    representative,
)
from tyrsearch.moe.stun import StunConfig, check_config, stun_prune

VOCAB = COMMON["vocab_size"]


@pytest.fixture
def batches() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(3))


def routed_top_k(model, batches) -> list[torch.Tensor]:
    """Per MoE layer, each token's top-k expert ids, from the router logits the model reports."""
    logits = model(batches, output_router_logits=True).router_logits
    top_k = model.config.num_experts_per_tok
    return [layer_logits.topk(top_k, dim=-1).indices for layer_logits in logits]


def pair_counts(top_k_index: torch.Tensor, experts: int) -> torch.Tensor:
    """Co-selection counted token by token."""
    counts = torch.zeros(experts, experts, dtype=torch.long)
    for row in top_k_index.tolist():
        for i in row:
            for j in row:
                counts[i, j] += 1
    return counts


def counted(model) -> list[torch.Tensor]:
    """Every weight that sparsity counts, enumerated by name: projections, routers, routed experts."""
    return [p for n, p in model.model.layers.named_parameters()
            if "shared_expert" not in n and (n.endswith("proj.weight") or n.endswith("mlp.gate.weight")
                                             or ".experts." in n)]


def zero_fraction(weights: list[torch.Tensor], dense_numel: int) -> float:
    return 1 - sum(int(torch.count_nonzero(w)) for w in weights) / dense_numel


# -- co-selection --------------------------------------------------------------------------------------------


def test_co_selection_counts_a_hand_made_routing():
    top_k_index = torch.tensor([[0, 2], [2, 1], [0, 2], [3, 1]])  # 4 tokens, top-2 of 4 experts
    expected = torch.tensor([[2, 0, 2, 0],
                             [0, 2, 1, 1],
                             [2, 1, 3, 0],
                             [0, 1, 0, 1]])
    assert torch.equal(calibration.co_selection(top_k_index, 4), expected)


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_the_pass_counts_what_the_routers_choose(name, batches):
    model = MOE_FAMILIES[name]()
    stats, calls = calibration.collect(model, adapter_for(model), batches, batch_size=3)
    assert calls == 3  # ceil(8 / 3) model calls, one pass
    moe = [s for s in stats if s.co_selection is not None]
    routed = routed_top_k(model, batches)
    assert len(moe) == len(routed) == 2  # Qwen2-MoE's layer 1 is a dense MLP
    for layer_stats, index in zip(moe, routed, strict=True):
        assert torch.equal(layer_stats.co_selection, pair_counts(index, layer_stats.co_selection.shape[0]))
        assert layer_stats.tokens == batches.numel()


def test_expert_norms_are_over_the_routed_tokens_only(batches):
    model = tiny_mixtral()
    inputs = []
    model.model.layers[1].mlp.gate.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    stats, _ = calibration.collect(model, adapter_for(model), batches)
    index = routed_top_k(model, batches)[1]
    x = inputs[0].reshape(-1, COMMON["hidden_size"]).double()  # the first call: the collect pass
    for e in range(6):
        routed = (index == e).any(-1)
        assert torch.allclose(stats[1].sq_sums[calibration.EXPERT_IN][e], x[routed].pow(2).sum(0))


# -- clustering, bisection, representatives ------------------------------------------------------------------


def test_complete_linkage_merges_by_the_farthest_members():
    d = torch.tensor([[0.0, 0.1, 0.5, 0.9],
                      [0.1, 0.0, 0.6, 0.4],
                      [0.5, 0.6, 0.0, 0.2],
                      [0.9, 0.4, 0.2, 0.0]], dtype=torch.float64)
    merges = complete_linkage(d, min_clusters=1)
    # {0,1} at 0.1, {2,3} at 0.2, then the two at their farthest pair 0.9 (single linkage would say 0.4)
    assert [(m.height, m.a, m.b) for m in merges] == [(0.1, 0, 1), (0.2, 2, 3), (0.9, 0, 2)]
    assert len(complete_linkage(d, min_clusters=2)) == 2


def test_bisection_hits_every_global_count_exactly_even_with_ties():
    heights = [[0.1, 0.3, 0.3], [0.2, 0.3], [0.05]]
    for merges in range(7):
        threshold, counts = global_threshold(heights, merges)
        assert sum(counts) == merges
        taken = [h for layer, c in zip(heights, counts, strict=True) for h in layer[:c]]
        left = [h for layer, c in zip(heights, counts, strict=True) for h in layer[c:]]
        if merges:  # the smallest threshold that makes enough merges: the highest merge taken
            assert max(taken) == threshold and all(h >= threshold for h in left)
        else:
            assert threshold is None
    assert global_threshold(heights, 4) == (0.3, [2, 1, 1])  # 3 merges below 0.3, one of the ties, layer order


def _layer(co_selection, *, weights=None, top_k=2) -> ExpertLayer:
    experts = len(co_selection)
    torch.manual_seed(0)
    gate_up = torch.randn(experts, 4, 3) if weights is None else weights[:, None, None].expand(experts, 4, 3)
    down = torch.randn(experts, 3, 2) if weights is None else weights[:, None, None].expand(experts, 3, 2)
    return ExpertLayer(co_selection=torch.tensor(co_selection), router=torch.randn(experts, 3), gate_up=gate_up,
                       down=down, top_k=top_k)


def test_co_selection_distance_is_normalised_against_chance():
    # 6 tokens, top-2: {0, 1} x3, {2, 3} x2, {0, 2} x1; expert 4 never selected
    layer = _layer([[4, 3, 1, 0, 0], [3, 3, 0, 0, 0], [1, 0, 3, 2, 0], [0, 0, 2, 2, 0], [0, 0, 0, 0, 0]])
    d = expert_distance(layer, router_weight=0.0)
    p01, p0, p1 = 3 / 6, 4 / 6, 3 / 6
    assert d[0, 1] == pytest.approx((1 - math.log(p01 / (p0 * p1)) / -math.log(p01)) / 2)
    assert d[0, 1] < 0.5 < d[0, 2] < d[0, 3] == 1  # together more often than chance, less, never
    assert torch.all(d[4] == 0) and torch.all(d[:, 4] == 0)  # nothing tells a never-selected expert apart
    both = expert_distance(layer, router_weight=0.5)
    assert torch.allclose(both, (d + expert_distance(layer, router_weight=1.0)) / 2)


def test_stun_clusters_co_selected_experts_and_keeps_the_more_used_of_two():
    # 22 tokens, top-2: {0,1} x9, {2,3} x8, {1,3} x3, {0,2} x1, {1,2} x1
    layer = _layer([[10, 9, 1, 0], [9, 13, 1, 3], [1, 1, 10, 8], [0, 3, 8, 11]])
    plan = StunExperts().select([layer], keep=2)
    # a 2-expert cluster's members are equally far from its centroid: the more often selected one stays
    assert plan.layers[0].kept == (1, 3)
    assert plan.layers[0].clusters == ((1, 0), (3, 2))
    p23, p2, p3 = 8 / 22, 10 / 22, 11 / 22  # {2, 3} is the second and last merge
    assert plan.info["threshold"] == pytest.approx((1 - math.log(p23 / (p2 * p3)) / -math.log(p23)) / 2)


def test_representative_is_the_member_nearest_the_centroid():
    layer = _layer([[5, 0, 0], [0, 1, 0], [0, 0, 9]], weights=torch.tensor([0.0, 1.0, 3.0]))
    assert representative(layer, [0, 1, 2]) == 1  # centroid 4/3: expert 1 is nearest, though least used
    assert representative(layer, [0, 2]) == 2  # a tie: the more used
    assert representative(layer, [0]) == 0
    unused = _layer([[5, 0, 0], [0, 0, 0], [0, 0, 9]], weights=torch.tensor([0.0, 1.0, 3.0]))
    assert representative(unused, [0, 1, 2]) == 0  # never selected: not a representative


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_stun_keeps_exactly_the_requested_global_count(name, batches):
    model = MOE_FAMILIES[name]()
    adapter = adapter_for(model)
    stats, _ = calibration.collect(model, adapter, batches)
    layers = [ExpertLayer(co_selection=s.co_selection, router=layer.mlp.gate.weight.detach(),
                          gate_up=layer.mlp.experts.gate_up_proj.detach(),
                          down=layer.mlp.experts.down_proj.detach(), top_k=layer.mlp.gate.top_k)
              for layer, s in zip(adapter.layers(model), stats, strict=True) if s.co_selection is not None]
    total = sum(x.experts for x in layers)
    for router_weight in (0.0, 0.5):
        for keep in range(2 * len(layers), total + 1):
            plan = StunExperts(router_weight=router_weight).select(layers, keep)
            assert sum(len(k.kept) for k in plan.layers) == keep
            for kept, layer in zip(plan.layers, layers, strict=True):
                assert len(kept.kept) >= layer.top_k
                members = sorted(e for c in kept.clusters for e in c)
                assert members == list(range(layer.experts))  # every expert in exactly one cluster


# -- the pipeline --------------------------------------------------------------------------------------------


def test_merge_averages_two_expert_clusters_weighted_by_use(batches):
    model = tiny_mixtral()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    report = stun_prune(model, batches, config=StunConfig(experts_keep=0.75, unstructured="none", merge=True))
    pairs = 0
    for layer, clusters, selected in zip((0, 1), report["experts"]["clusters"], report["experts"]["selected"],
                                         strict=True):
        moe = model.model.layers[layer].mlp
        for slot, cluster in enumerate(clusters):
            f = torch.tensor([selected[e] for e in cluster], dtype=torch.float64)
            weight = f / f.sum() if len(cluster) == 2 else torch.tensor([1.0] + [0.0] * (len(cluster) - 1))
            pairs += len(cluster) == 2
            for name, param in (("gate.weight", moe.gate.weight), ("experts.gate_up_proj", moe.experts.gate_up_proj),
                                ("experts.down_proj", moe.experts.down_proj)):
                members = dense[f"model.layers.{layer}.mlp.{name}"][list(cluster)].double()
                expected = (members * weight.view(-1, *[1] * (members.dim() - 1))).sum(0)
                assert torch.allclose(param[slot].double(), expected, atol=1e-6)
    assert pairs > 0  # the test saw a merge (and a 3-expert cluster, whose representative stays as it was)


def test_frequency_drops_the_least_used_and_random_is_seeded(batches):
    model = tiny_mixtral()
    routers = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    used = [pair_counts(index, 6).diagonal() for index in routed_top_k(model, batches)]
    report = stun_prune(model, batches, config=StunConfig(experts_keep=8, method="frequency", unstructured="none"))
    assert report["experts"]["kept"] == [4, 4]
    for layer, router, count in zip(model.model.layers, routers, used, strict=True):
        kept = [e for e in range(6) if any(torch.equal(router[e], row) for row in layer.mlp.gate.weight)]
        assert min(count[kept]) >= max(count[[e for e in range(6) if e not in kept]])
    kept_by_seed = []
    for seed in (0, 0, 1):
        model = tiny_mixtral()
        config = StunConfig(experts_keep=8, method="random", unstructured="none", seed=seed)
        kept_by_seed.append(stun_prune(model, batches, config=config)["experts"]["clusters"])
    assert kept_by_seed[0] == kept_by_seed[1] != kept_by_seed[2]


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
@pytest.mark.parametrize("stage", ["wanda", "owl"])
def test_the_unstructured_stage_hits_the_total_sparsity(name, stage, batches):
    model = MOE_FAMILIES[name]()
    dense_numel = sum(w.numel() for w in counted(model))
    report = stun_prune(model, batches, config=StunConfig(experts_keep=0.75, sparsity=0.6, unstructured=stage))
    measured = zero_fraction(counted(model), dense_numel)
    assert measured == pytest.approx(0.6, abs=1e-3)
    assert report["sparsity"]["total"] == pytest.approx(measured, abs=1e-12)
    removed = dense_numel - sum(w.numel() for w in counted(model))
    assert report["sparsity"]["experts"] == pytest.approx(removed / dense_numel) and removed > 0
    assert report["sparsity"]["experts"] + report["sparsity"]["unstructured"] == pytest.approx(measured)
    attention = model.model.layers[0].self_attn.q_proj.weight
    assert 0.3 < 1 - torch.count_nonzero(attention) / attention.numel() < 0.7  # attention is pruned too
    assert all(torch.count_nonzero(layer.mlp.gate.weight) == layer.mlp.gate.weight.numel()
               for layer in model.model.layers if hasattr(layer.mlp, "experts"))  # routers stay dense
    if stage == "owl":
        assert len(set(report["sparsity"]["unstructured_stage_per_layer"])) > 1  # layers differ


def test_wanda_zeroes_the_lowest_weight_times_input_norm_in_every_row(batches):
    model = tiny_mixtral()
    seen = []
    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    weight = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    report = stun_prune(model, batches, config=StunConfig(method="none", sparsity=0.25))
    norm = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double().pow(2).sum(0).sqrt()
    pruned = model.model.layers[0].self_attn.o_proj.weight
    score = weight.double().abs() * norm
    zeros = (pruned == 0).sum(1)
    share = report["sparsity"]["unstructured_stage_per_layer"][0]  # a little over 0.25: the routers stay dense
    assert 0.25 < share < 0.26 and int(zeros.sum()) == round(share * weight.numel())
    assert zeros.max() - zeros.min() <= 1  # spread over the rows, 64 x 64
    for row in range(weight.shape[0]):
        cut = score[row][pruned[row] == 0].max()
        assert cut <= score[row][pruned[row] != 0].min()


def test_semi_structured_is_two_zeros_in_every_four_inputs(batches):
    model = MOE_FAMILIES["qwen2_moe"]()
    report = stun_prune(model, batches, config=StunConfig(experts_keep=0.75, semi_structured=True))
    matrices = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        matrices += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight]
        if hasattr(mlp, "experts"):
            matrices += [*mlp.experts.gate_up_proj, *mlp.experts.down_proj]
        else:
            matrices += [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    for w in matrices:
        groups = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)  # [rows, in / 4]
        assert torch.all(groups == 2)
    assert report["sparsity"]["unstructured_stage"] == 0.5 and report["sparsity"]["target"] is None


@pytest.mark.parametrize("experts", [6, 16])
def test_one_calibration_pass_whatever_the_experts(experts, batches):
    torch.manual_seed(0)
    config = MixtralConfig(**COMMON, intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2,
                           num_local_experts=experts, num_experts_per_tok=2)
    model = MixtralForCausalLM(config).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    report = stun_prune(model, batches, config=StunConfig(experts_keep=0.5, sparsity=0.5, unstructured="owl",
                                                           batch_size=4))
    assert len(calls) == report["calibration"]["forward_passes"] == 2  # 8 sequences in calls of 4


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_save_and_reload_give_equal_logits(name, batches, tmp_path):
    model = MOE_FAMILIES[name]()
    report = stun_prune(model, batches, config=StunConfig(experts_keep=0.6, sparsity=0.5, merge=True,
                                                           router_weight=0.3))
    before = model(batches).logits
    folder = save_pruned(model, None, tmp_path / "model", result=report)
    config = json.loads((folder / "config.json").read_text())
    assert [block.get("num_experts") for block in config["block_configs"]] == report["experts"]["kept"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(reloaded(batches).logits, before)
    assert json.loads((folder / "result.json").read_text())["sparsity"]["total"] == report["sparsity"]["total"]


def test_trust_remote_code_reloads_stun_models_without_tyrsearch(batches, tmp_path):
    models = {}
    for name, factory in MOE_FAMILIES.items():
        models[name] = factory()
        stun_prune(models[name], batches, config=StunConfig(experts_keep=0.75, sparsity=0.5))
    rows = reload_without_tyrsearch(models, batches, tmp_path)
    assert [(name, diff) for name, _, diff in rows] == [(name, "0.0") for name in sorted(MOE_FAMILIES)]


# -- errors ----------------------------------------------------------------------------------------------------


BAD_CONFIGS = [  # the Python faces name the parameter (the CLI shows its flag: test_bad_stun_input_...)
    ({"experts_keep": 13, "sparsity": 0.5}, "experts_keep is too high: cannot keep 13 experts: the model has 12"),
    ({"experts_keep": 3, "sparsity": 0.5}, "experts_keep is too low: cannot keep 3 experts"),
    ({"experts_keep": 4, "method": "frequency", "sparsity": 0.6}, None),  # 2 + 2: fine
    ({"experts_keep": 5, "method": "random", "sparsity": 0.5}, None),
    ({"experts_keep": 0.5, "sparsity": 1.0}, "sparsity must be in [0, 1)"),
    ({"experts_keep": 0.5, "sparsity": 0.1}, "sparsity 0.1 is below the expert stage's share"),
    ({"experts_keep": 1.5, "sparsity": 0.5}, "experts_keep 1.5 as a share must be in (0, 1]"),
    ({"experts_keep": "many", "sparsity": 0.5}, "experts_keep 'many' is neither a share"),
    ({"experts_keep": 0.5, "sparsity": 0.5, "method": "lottery"}, "method 'lottery' is unknown"),
    ({"experts_keep": 0.5, "sparsity": 0.5, "unstructured": "sparsegpt"}, "unstructured 'sparsegpt' is unknown"),
    ({"experts_keep": 0.5, "sparsity": 0.5, "method": "frequency", "merge": True}, "merge averages"),
    ({"experts_keep": 0.5, "sparsity": 0.5, "semi_structured": True}, "semi_structured fixes the unstructured"),
    ({"experts_keep": 0.5, "semi_structured": True, "unstructured": "owl"}, "semi_structured prunes 2:4 by wanda"),
    ({"experts_keep": 0.5}, "unstructured wanda needs sparsity"),
    ({"experts_keep": 0.5, "sparsity": 0.5, "unstructured": "none"}, "unstructured none zeroes nothing"),
    ({"method": "none", "unstructured": "none"}, "method none and unstructured none prune nothing"),
    ({"method": "none", "experts_keep": 0.5, "sparsity": 0.5}, "method none keeps every expert: drop experts_keep"),
    ({"sparsity": 0.5}, "method stun needs experts_keep"),
    ({"experts_keep": 0.5, "sparsity": 0.5, "router_weight": 2.0}, "router_weight must be in [0, 1]"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_CONFIGS)
def test_bad_configurations_are_user_errors_before_any_work(fields, message):
    model = tiny_mixtral()  # 2 layers x 6 experts, top-2
    if message is None:
        assert check_config(model, StunConfig(**fields)).keep == fields["experts_keep"]
        return
    with pytest.raises(ParameterError, match="^" + re.escape(message)):
        check_config(model, StunConfig(**fields))


def test_proportional_baselines_refuse_a_layer_below_top_k():
    model = tiny_mixtral()
    remove_experts(model, {1: [0, 1]})  # 6 + 2 experts, top-2
    check_config(model, StunConfig(experts_keep=5, sparsity=0.5))  # stun's clusters stop at top-k: 3 + 2
    with pytest.raises(UserError, match=r"leaves MoE layer 1 with 1, fewer than its top-k \(2\)"):
        check_config(model, StunConfig(experts_keep=5, method="frequency", sparsity=0.5))


def test_a_dense_model_is_refused():
    assert isinstance(tiny_llama(), LlamaForCausalLM)
    with pytest.raises(UserError, match="no Mixture-of-Experts layers.*moefy"):
        check_config(tiny_llama(), StunConfig(experts_keep=0.5, sparsity=0.5))


# -- the command line and the export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory, smollm2_folder):
    """A tiny random Mixtral with SmolLM2's tokenizer, saved as an HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    torch.manual_seed(0)
    config = MixtralConfig(**{**COMMON, "vocab_size": len(tokenizer)}, intermediate_size=32, num_hidden_layers=2,
                           num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
    folder = tmp_path_factory.mktemp("moe") / "model"
    MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _stun_args(model, text, out, **override):
    args = {"--model": str(model), "--out": str(out), "--experts-keep": "0.75", "--sparsity": "0.5",
            "--calib": str(text), "--calib-seqs": "4", "--seq-len": "32", **override}
    return ["stun", *[x for kv in args.items() for x in kv if x is not None]]


@pytest.fixture(scope="module")
def stun_run(moe_folder, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("stun") / "pruned"
    ran = run_cli(*_stun_args(moe_folder, text_file, out, **{"--merge": None, "--router-weight": "0.2"}), "--json")
    assert ran.returncode == 0, ran.stderr
    return out, json.loads(ran.stdout)


def test_stun_command_writes_a_model_that_reloads(stun_run):
    out, result = stun_run
    assert result["sparsity"]["total"] == pytest.approx(0.5, abs=1e-3)
    assert result["experts"]["total_kept"] == 9 and sum(result["experts"]["kept"]) == 9
    assert result["calibration"]["forward_passes"] == 1 and result["calibration"]["source"].endswith("text.txt")
    assert json.loads((out / "result.json").read_text()) == result
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert [layer.mlp.gate.weight.shape[0] for layer in reloaded.model.layers] == result["experts"]["kept"]


@pytest.mark.parametrize(("override", "message"), [
    ({"--experts-keep": "13"}, "cannot keep 13 experts"),
    ({"--experts-keep": "3"}, "at least 4 must stay"),
    ({"--experts-keep": "many"}, "neither a share"),
    ({"--sparsity": "1.0"}, "--sparsity must be in [0, 1)"),
    ({"--sparsity": "0.05"}, "below the expert stage's share"),
    ({"--method": "frequency", "--merge": None}, "needs --method stun"),
    ({"--method": "lottery"}, "--method 'lottery' is unknown"),
    ({"--semi-structured": None}, "--semi-structured fixes the unstructured stage at 2:4 (50% of every matrix): drop "
                                  "--sparsity"),
    ({"--model": "DENSE"}, "no Mixture-of-Experts layers"),
])
def test_bad_stun_input_is_one_line_exit_2_and_writes_nothing(override, message, moe_folder, text_file, tmp_path):
    dense = tmp_path / "dense"
    save_pruned(tiny_llama(vocab=VOCAB), None, dense)
    AutoTokenizer.from_pretrained(moe_folder).save_pretrained(dense)
    if override.get("--model") == "DENSE":
        override["--model"] = str(dense)
    ran = run_cli(*_stun_args(moe_folder, text_file, tmp_path / "out", **override))
    assert ran.returncode == 2, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], ran.stderr
    assert not (tmp_path / "out").exists()


def test_stun_refuses_a_used_out_folder(moe_folder, text_file, stun_run):
    out, _ = stun_run
    before = sorted(p.name for p in out.iterdir())
    ran = run_cli(*_stun_args(moe_folder, text_file, out))
    assert ran.returncode == 2 and "already exists and is not empty" in ran.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_expert_pruned_model_exports_to_onnx_and_verifies(stun_run, tmp_path):
    out, _ = stun_run
    ran = run_cli("export", "--model", str(out), "--out", str(tmp_path / "onnx" / "model.onnx"), "--json")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    check = report["verification"]
    assert report["verified"] and check["checker"] == "passed"
    assert check["max_abs_diff"] < 1e-3 and check["argmax_agreement"] == 1.0

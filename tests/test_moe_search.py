"""The global search over per-layer expert counts of MoE models (issue 6, beyond STUN): a supernet of the
`experts` unit whose variants STUN's clustering picks, searched under the exact expert budget."""

import json

import optuna
import pytest
import torch

from tests.conftest import tiny_mixtral, tiny_qwen2_moe
from tyrsearch.errors import UserError
from tyrsearch.local import make_criterion
from tyrsearch.materialize import save_pruned
from tyrsearch.models import EXPERTS, adapter_for
from tyrsearch.moe.experts import ExpertLayer, clusters_after, complete_linkage, expert_distance, representative
from tyrsearch.search import study as schema
from tyrsearch.search.driver import Search, SearchConfig, materialize, open_study
from tyrsearch.space import Fitness, SearchSpace, Stage, UnitSpace, load_space
from tyrsearch.supernet import build_supernet

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = SearchSpace(family="moe", units={EXPERTS: UnitSpace(min_keep=2, step=1)}, levels=1, iterations=1,
                    generations=3, offspring=4,
                    selection=(Stage(survivors=4, tokens=32), Stage(survivors=1, tokens=64)), fitness=Fitness(top_k=16))


def _batches(count: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (count, 16), generator=torch.Generator().manual_seed(seed))


def test_the_bundled_moe_space_searches_experts():
    space = load_space("moe")
    assert set(space.units) == {EXPERTS} and space.units[EXPERTS].min_keep == 2
    assert adapter_for(tiny_mixtral()).search_space == "moe"


def test_stun_variants_are_the_cluster_representatives_of_each_count():
    model = tiny_mixtral()
    vocab = model.config.vocab_size
    dense = adapter_for(model).shapes(model)
    centre = [s.with_units(EXPERTS, 4) for s in dense]
    net = build_supernet(model, make_criterion("stun"), _batches(6, 1, vocab), space=SPACE, centre=centre,
                         progress=False)
    assert net.grid == [{EXPERTS: [5, 4, 3]}] * 2
    # layer 0 sees the dense model's tokens: the same co-selection as a hook on the dense layer
    seen = []
    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[1] if len(args) > 1 else kwargs["top_k_index"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=_batches(6, 1, vocab))
    handle.remove()
    index = torch.cat([i.reshape(-1, 2) for i in seen])
    hits = torch.nn.functional.one_hot(index, 6).sum(1)
    mlp = model.model.layers[0].mlp
    layer = ExpertLayer(co_selection=hits.T @ hits, router=mlp.gate.weight.detach(),
                        gate_up=mlp.experts.gate_up_proj.detach(), down=mlp.experts.down_proj.detach(), top_k=2)
    merges = complete_linkage(expert_distance(layer, router_weight=0.0), min_clusters=2)
    for level, keep in zip((-1, 0, 1), (5, 4, 3), strict=True):
        expected = sorted(representative(layer, c) for c in clusters_after(6, merges[:6 - keep]))
        assert net.selection(0, EXPERTS, level).kept.tolist() == expected


def test_stun_criterion_refuses_groups_without_coselection():
    model = tiny_mixtral()
    shape = adapter_for(model).shape(model.model.layers[0])
    group = adapter_for(model).group(model.model.layers[0].state_dict(), shape, EXPERTS, head_dim=8)
    with pytest.raises(UserError, match="co-selection"):
        make_criterion("stun").select(group, 3)


@pytest.mark.parametrize("factory", [tiny_mixtral, tiny_qwen2_moe])
def test_expert_count_search_keeps_the_global_count_and_saves_a_reloadable_model(factory, tmp_path):
    model = factory()
    vocab = model.config.vocab_size
    config = SearchConfig(target=0.2, criterion="stun")
    study = open_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="moe", space=SPACE, config=config,
                       resume=False)
    search = Search(model=model, calibration=_batches(6, 1, vocab), fitness_batches=_batches(4, 2, vocab),
                    space=SPACE, config=config, study=study, supernet_dir=tmp_path / "nets", progress=False)
    result = search.run()
    moe_layers = [i for i, s in enumerate(search.dense) if s.experts]
    start = json.loads(json.dumps(schema.iteration_record(study, 0).start))
    counts = {t.number: sum(t.user_attrs["experts"]) for t in study.trials}
    total = sum(result.supernet.keep(i, EXPERTS, start[f"L{i:02d}.{EXPERTS}"]) for i in moe_layers)
    assert set(counts.values()) == {total}  # every candidate keeps the same number of experts
    assert total < sum(search.dense[i].experts for i in moe_layers)
    pruned = materialize(model, result)
    shapes = adapter_for(pruned).shapes(pruned)
    assert sum(shapes[i].experts for i in moe_layers) == total
    save_pruned(pruned, None, tmp_path / "model")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = _batches(2, 3, vocab)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=1e-5)

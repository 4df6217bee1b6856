"""The supernet: level grids, expectation error accumulation, parity with the one-shot pruner, storage."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import tiny_gemma3, tiny_llama
from tyrsearch.errors import UserError
from tyrsearch.local import make_criterion
from tyrsearch.models import MLP, Q_HEADS, adapter_for
from tyrsearch.pruner import prune
from tyrsearch.space import Fitness, SearchSpace, Stage, UnitSpace
from tyrsearch.supernet import Supernet, build_supernet, level_keeps

SPACE = SearchSpace(family="llama", units={Q_HEADS: UnitSpace(min_keep=0, step=1), MLP: UnitSpace(min_keep=4, step=8)},
                    levels=2, iterations=1, generations=1, offspring=4, selection=(Stage(survivors=4, tokens=64),),
                    fitness=Fitness())


def _centre(model):
    adapter = adapter_for(model)
    return [s.with_units(Q_HEADS, 2).with_units(MLP, 40) for s in adapter.shapes(model)]


def test_level_keeps_step_and_clip():
    assert level_keeps(centre=40, step=8, levels=2, min_keep=4, units=64) == [56, 48, 40, 32, 24]
    assert level_keeps(centre=2, step=1, levels=2, min_keep=0, units=3) == [3, 3, 2, 1, 0]
    assert level_keeps(centre=10, step=8, levels=2, min_keep=4, units=64) == [26, 18, 10, 4, 4]


def test_grid_and_variants(tokens):
    model = tiny_llama()
    net = build_supernet(model, make_criterion("osscar"), tokens, space=SPACE, centre=_centre(model), progress=False)
    assert net.grid[0] == {Q_HEADS: [3, 3, 2, 1, 0], MLP: [56, 48, 40, 32, 24]}
    assert len(net.selection(1, MLP, 1).kept) == 32 and net.selection(1, MLP, 1).consumer.shape == (48, 32)
    assert len(net.selection(2, Q_HEADS, 2).kept) == 0  # level 2 removes the attention block
    assert len(net.selection(0, Q_HEADS, 1).kept) == 2  # one head in each of the 2 groups


def test_centre_levels_equal_sequential_one_shot_pruning(tokens):
    """With expectation accumulation, the centre variants are exactly a sequential prune to the centre."""
    model = tiny_llama()
    net = build_supernet(model, make_criterion("osscar"), tokens, space=SPACE, centre=_centre(model), progress=False)
    from_supernet = net.apply(copy.deepcopy(model), [{Q_HEADS: 0, MLP: 0}] * 3)
    one_shot = prune(copy.deepcopy(model), _centre(model), make_criterion("osscar"), tokens, progress=False)
    assert torch.allclose(from_supernet(tokens).logits, one_shot(tokens).logits, atol=1e-5)


def test_expectation_changes_what_later_layers_see(tokens):
    model = tiny_llama()
    with torch.no_grad():
        dense_hidden = model(tokens, output_hidden_states=True).hidden_states
    dense_rms = [h.pow(2).mean().sqrt().item() for h in dense_hidden[:3]]
    expected = build_supernet(model, make_criterion("wanda"), tokens, space=SPACE, centre=_centre(model),
                              progress=False)
    dense_calibrated = build_supernet(model, make_criterion("wanda"), tokens, space=SPACE, centre=_centre(model),
                                      expectation=False, progress=False)
    assert dense_calibrated.manifest["input_rms"] == pytest.approx(dense_rms, rel=1e-5)
    assert expected.manifest["input_rms"][0] == pytest.approx(dense_rms[0], rel=1e-5)  # layer 0: same inputs
    assert expected.manifest["input_rms"][1] != pytest.approx(dense_rms[1], rel=1e-3)  # then they differ


def test_dense_model_is_untouched(tokens):
    model = tiny_llama()
    before = model(tokens).logits
    build_supernet(model, make_criterion("osscar"), tokens, space=SPACE, centre=_centre(model), progress=False)
    assert isinstance(model, LlamaForCausalLM) and torch.equal(model(tokens).logits, before)


def test_save_load_round_trip_and_corruption(tokens, tmp_path):
    model = tiny_gemma3()
    space = SearchSpace(**{**SPACE.__dict__, "family": "gemma3_text"})
    centre = [s.with_units(Q_HEADS, 3).with_units(MLP, 40) for s in adapter_for(model).shapes(model)]
    net = build_supernet(model, make_criterion("osscar"), tokens, space=space, centre=centre, progress=False)
    folder = net.save(tmp_path / "supernet")
    loaded = Supernet.load(folder)
    assert loaded.grid == net.grid and loaded.manifest["model"] == net.manifest["model"]
    levels = [{Q_HEADS: 1, MLP: -1}, {Q_HEADS: 0, MLP: 2}, {Q_HEADS: -2, MLP: 0}]
    a = net.apply(copy.deepcopy(model), levels)
    b = loaded.apply(copy.deepcopy(model), levels)
    assert torch.equal(a(tokens).logits, b(tokens).logits)
    # disk: kept indices and refit slices only, well under 3x the decoder layers
    on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    dense = sum(p.numel() * 4 for p in model.model.layers.parameters())
    assert on_disk < 3 * dense
    shard = next(folder.glob("layer001.*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(UserError, match="missing or corrupt.*rebuild"):
        Supernet.load(folder)

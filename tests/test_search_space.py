"""Search-space YAML: the bundled spaces load and fit their models; every mistake is one clear error."""

import math
from importlib import resources

import pytest
import yaml

from tests.conftest import tiny_gemma3, tiny_llama
from tyrsearch.errors import UserError
from tyrsearch.models import adapter_for
from tyrsearch.search import driver
from tyrsearch.space import Stage, Validation, load_space, parse_space


@pytest.mark.parametrize(("name", "factory"), [("llama", tiny_llama), ("llama-heads", tiny_llama),
                                              ("gemma3", tiny_gemma3)])
def test_bundled_spaces_load_and_fit_their_family(name, factory):
    space = load_space(name)
    model = factory()
    adapter = adapter_for(model)
    assert space.family in adapter.model_types
    space.check_model(adapter.shapes(model), adapter.unit_types)
    assert space.selection[0] == Stage(survivors=12, tokens=512) and space.selection[-1].survivors == 1
    assert space.fitness.metric == "kl"
    assert space.validation == Validation(candidates=4, tokens=8192)
    raw = yaml.safe_load((resources.files("tyrsearch.search_spaces") / f"{name}.yaml").read_text())
    del raw["validation"]
    assert parse_space(raw).validation is None  # a space without it picks winners by fitness alone


def _llama_raw():
    """The bundled space with both Llama unit types (query heads and MLP channels)."""
    return yaml.safe_load((resources.files("tyrsearch.search_spaces") / "llama-heads.yaml").read_text())


def test_a_yaml_file_path_works(tmp_path):
    path = tmp_path / "mine.yaml"
    raw = _llama_raw()
    raw["levels"] = 2
    path.write_text(yaml.safe_dump(raw))
    assert load_space(str(path)).levels == 2


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.update(colour="red"), "unknown key 'colour'"),
    (lambda r: r["units"]["mlp"].update(step=-64), "units.mlp.step must be an integer >= 1"),
    (lambda r: r["units"]["mlp"].update(stride=3), "unknown key 'stride' in units.mlp"),
    (lambda r: r["units"].update(neurons={"step": 1}), "unknown unit type 'neurons'"),
    (lambda r: r["units"].update(kv_groups={"step": 1}), "choose one attention unit type"),
    (lambda r: r.pop("levels"), "missing key 'levels'"),
    (lambda r: r["selection"].append({"survivors": 4, "tokens": 16}), "each selection stage must keep fewer"),
    (lambda r: r.update(fitness={"metric": "vibes"}), "fitness.metric must be kl or ppl"),
    (lambda r: r.update(offspring=2), "keeps 12 of only 2 offspring"),
    (lambda r: r.update(validation={"candidates": 0, "tokens": 512}), "validation.candidates must be an integer >= 1"),
    (lambda r: r.update(validation={"candidates": 2, "sequences": 4}), "unknown key 'sequences' in validation"),
    (lambda r: r.update(validation=[4]), "validation must be a mapping"),
    (lambda r: r["units"]["mlp"].update(min_keep=1.5), "min_keep must be a count of units or a fraction in"),
])
def test_malformed_spaces_are_refused(change, message):
    raw = _llama_raw()
    change(raw)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_space(raw)


def test_min_keep_above_the_layers_units_is_refused():
    raw = _llama_raw()
    raw["units"]["q_heads"]["min_keep"] = 4  # the tiny Llama has 3 query heads per group
    model = tiny_llama()
    adapter = adapter_for(model)
    with pytest.raises(UserError, match="q_heads min_keep 4 is above layer 0's 3 units"):
        parse_space(raw).check_model(adapter.shapes(model), adapter.unit_types)


def test_a_unit_the_family_cannot_prune_is_refused():
    raw = _llama_raw()
    raw["units"] = {"kv_groups": {"step": 1}, "mlp": {"step": 8}}
    model = tiny_gemma3()
    adapter = adapter_for(model)
    with pytest.raises(UserError, match="'kv_groups' is not prunable in this model"):
        parse_space(raw).check_model(adapter.shapes(model), adapter.unit_types)


def test_unknown_names_and_broken_yaml(tmp_path):
    with pytest.raises(UserError, match="unknown search space 'bert': use one of gemma3, llama"):
        load_space("bert")
    broken = tmp_path / "broken.yaml"
    broken.write_text("units: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_space(str(broken))
    with pytest.raises(UserError, match="not found"):
        load_space(str(tmp_path / "missing.yaml"))


def test_a_fractional_min_keep_is_a_share_of_each_layers_units():
    raw = _llama_raw()
    raw["units"]["mlp"]["min_keep"] = 0.25
    space = parse_space(raw)
    assert space.units["mlp"].floor(1536) == 384 and space.units["mlp"].floor(50) == 13  # rounded up
    raw["units"]["q_heads"]["min_keep"] = 1
    assert parse_space(raw).units["q_heads"].floor(3) == 1  # a count stays a count
    model = tiny_llama()
    adapter = adapter_for(model)
    dense = adapter.shapes(model)
    floor = driver.floor_of(space, dense)
    assert [s.intermediate for s in floor] == [math.ceil(0.25 * s.intermediate) for s in dense]

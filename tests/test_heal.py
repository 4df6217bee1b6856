"""Healing after pruning: LoRA adapters (peft) merged into the pruned shapes, `prune` and `search` with
`heal_steps` (the healed model, the one before it, the figures), resuming a killed heal, and bad input."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import VOCAB, kl_to_teacher, run_cli, search_args, tiny_llama
from tyrsearch import api
from tyrsearch.errors import ParameterError
from tyrsearch.healing import DistillConfig, Heal, distill
from tyrsearch.local import make_criterion
from tyrsearch.models import LayerShape, adapter_for
from tyrsearch.pruner import prune


@pytest.fixture(scope="module")
def teacher():
    """A tiny Llama whose projections are scaled up: at the random init's scale its logits are nearly uniform
    and cutting its MLPs would hardly change them."""
    model = tiny_llama(layers=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(6)
    return model


@pytest.fixture(scope="module")
def pruned(teacher):
    """The teacher with its MLPs cut to a third and a half (per-layer shapes); each test trains a copy."""
    student = copy.deepcopy(teacher)
    calibration = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))
    plan = [LayerShape(kv_heads=d.kv_heads, q_per_kv=d.q_per_kv, intermediate=d.intermediate // (3 - i))
            for i, d in enumerate(adapter_for(student).shapes(student))]
    prune(student, plan, make_criterion("magnitude"), calibration, progress=False)
    return student


LORA = DistillConfig(steps=16, lr=1e-2, warmup=1, save_every=8, method="lora", lora_rank=4)


def test_lora_heals_through_adapters_merged_into_the_pruned_shapes(teacher, pruned, windows, tmp_path):
    student = copy.deepcopy(pruned)
    before = {name: value.clone() for name, value in student.state_dict().items()}
    distill(teacher, student, windows, tmp_path, config=LORA, progress=False)
    assert kl_to_teacher(student, teacher, windows[:8]) < 0.9 * kl_to_teacher(pruned, teacher, windows[:8])
    after = student.state_dict()
    assert {name: value.shape for name, value in after.items()} == {n: v.shape for n, v in before.items()}
    changed = {name for name, value in after.items() if not torch.equal(value, before[name])}
    assert changed == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down")}
    assert not hasattr(student, "peft_config") and type(student.model.layers[0].mlp.up_proj) is torch.nn.Linear


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 12:
            raise KeyboardInterrupt


def test_an_interrupted_lora_heal_resumes_to_the_weights_of_an_uninterrupted_one(teacher, pruned, windows, tmp_path):
    whole = copy.deepcopy(pruned)
    distill(teacher, whole, windows, tmp_path / "whole", config=LORA, progress=False)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, copy.deepcopy(pruned), windows, tmp_path / "cut", config=LORA, progress=False,
                callbacks=[_Interrupt()])
    assert (tmp_path / "cut" / "checkpoint-8" / "adapter_model.safetensors").is_file()  # adapters only
    resumed = copy.deepcopy(pruned)
    assert distill(teacher, resumed, windows, tmp_path / "cut", config=LORA, progress=False)[-1]["step"] == 16
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


@pytest.mark.parametrize(("settings", "parameter"), [
    ({"steps": -1}, "heal_steps"), ({"lr": 0}, "heal_lr"), ({"train": "attention"}, "heal_train"),
    ({"method": "qlora"}, "heal_method"), ({"text": "c4,code"}, "heal_text")])
def test_bad_heal_settings_name_their_parameter(settings, parameter):
    with pytest.raises(ParameterError) as error:
        Heal(**{"steps": 2, **settings})
    assert error.value.parameter == parameter


# ---------------------------------------------------------------------------------------------------------
# prune and search with heal_steps (tiny Llama, SmolLM2's tokenizer: heal windows of 4 x 256 tokens)

def _shapes(folder) -> dict:
    return {name: value.shape for name, value in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_prune_with_healing_saves_the_healed_model_beside_the_one_before(tiny_folder, text_file, tmp_path):
    out = tmp_path / "healed"
    result = api.prune(tiny_folder, sparsity=0.4, out=out, calib=str(text_file), calib_seqs=4, seq_len=32,
                       eval_text=str(text_file), eval_tokens=256, heal_steps=2, heal_text=str(text_file),
                       heal_lr=1e-3, progress=False)
    heal = result.figures["heal"]
    assert json.loads((out / "result.json").read_text()) == result.to_json()
    assert (heal["steps"], heal["train_tokens"], heal["method"]) == (2, 2 * 4 * 256, "full")
    assert heal["epochs"] == pytest.approx(2 * 4 / heal["text_windows"], abs=1e-3)
    assert [row["step"] for row in heal["loss"]] == [2]  # every 10 steps, and the last one when fewer
    assert heal["loss"][0]["tokens_per_s"] > 0
    before, after = result.figures["held_out"][str(text_file)], heal["held_out"][str(text_file)]
    assert before["tokens"] == after["tokens"] and before["ppl"] != after["ppl"]
    oneshot = tmp_path / "healed-oneshot"
    assert _shapes(out) == _shapes(oneshot)
    healed, first = (AutoModelForCausalLM.from_pretrained(folder).state_dict() for folder in (out, oneshot))
    changed = {name for name in healed if not torch.equal(healed[name], first[name])}
    assert changed and all(".mlp." in name for name in changed)
    assert not (tmp_path / "healed.checkpoints").exists()


def test_prune_heal_needs_an_out_folder_and_calibration_text(tiny_folder):
    with pytest.raises(ParameterError, match="heal_steps needs out"):
        api.prune(tiny_folder, sparsity=0.4, heal_steps=2, progress=False)
    with pytest.raises(ParameterError, match="held-out text"):
        api.prune(tiny_folder, sparsity=0.4, out="unused", heal_steps=2, heal_text="wiki-summaries", progress=False)


class _Killed(Exception):
    pass


def test_a_search_killed_while_healing_resumes_to_the_weights_of_an_uninterrupted_one(
        tiny_folder, text_file, tiny_space, tmp_path, monkeypatch):
    heal = ["--heal-steps", "3", "--heal-text", str(text_file), "--heal-lr", "1e-3", "--eval-text", str(text_file),
            "--eval-tokens", "128", "--json"]
    whole = run_cli(*search_args(tiny_folder, text_file, tiny_space, tmp_path / "whole", *heal))
    assert whole.returncode == 0, whole.stderr
    figures = json.loads(whole.stdout)
    assert figures == json.loads((tmp_path / "whole" / "result.json").read_text())
    assert figures["heal"]["held_out"].keys() == figures["held_out"].keys()
    assert _shapes(tmp_path / "whole" / "model") == _shapes(tmp_path / "whole" / "model-oneshot")

    from tyrsearch import healing

    step = healing._Distiller.training_step

    def training_step(self, *args, **kwargs):  # the process dies in the heal's third step
        if self.state.global_step == 2:
            raise _Killed
        return step(self, *args, **kwargs)

    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        patch.setattr(healing._Distiller, "training_step", training_step)
        with pytest.raises(_Killed):
            api.search(tiny_folder, target=0.4, out=cut, space=tiny_space, calib=str(text_file), calib_seqs=4,
                       seq_len=32, supernet_dir=tmp_path / "nets", heal_steps=3, heal_text=str(text_file),
                       heal_lr=1e-3, progress=False)
    assert (cut / "model-oneshot").is_dir() and (cut / "model.checkpoints").is_dir() and not (cut / "model").exists()
    resumed = run_cli(*search_args(tiny_folder, text_file, tiny_space, cut, "--resume", *heal))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["layers"] == figures["layers"]
    one, other = (AutoModelForCausalLM.from_pretrained(folder / "model").state_dict() for folder in (tmp_path / "whole",
                                                                                                     cut))
    for name, value in one.items():
        torch.testing.assert_close(other[name], value, msg=name)


def test_healing_aware_selection_keeps_the_candidate_closest_to_the_dense_model_once_healed(
        tiny_folder, text_file, tiny_space, tmp_path):
    import optuna

    from tyrsearch.search import study as schema

    out = tmp_path / "run"
    args = search_args(tiny_folder, text_file, tiny_space, out, "--heal-steps", "1", "--heal-text", str(text_file),
                       "--heal-lr", "1e-3", "--heal-candidates", "3", "--heal-select-steps", "2", "--json")
    ran = run_cli(*args)
    assert ran.returncode == 0, ran.stderr
    figures = json.loads(ran.stdout)
    rows = figures["heal_select"]["candidates"]
    assert len(rows) == 3 and figures["heal_select"]["steps"] == 2
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name=figures["study"]["name"], storage=storage)
    trials = {t.number: t for t in study.trials}
    healed = [t for t in study.trials if schema.healed_candidate(t) is not None]
    assert sorted(schema.healed_candidate(t) for t in healed) == sorted(row["trial"] for row in rows)
    assert {schema.healed_candidate(t): t.value for t in healed} == {row["trial"]: row["healed_kl"] for row in rows}
    keeps = [json.dumps(trials[row["trial"]].user_attrs["keeps"]) for row in rows]
    assert len(set(keeps)) == 3  # distinct candidates, best search fitness first
    assert [row["fitness"] for row in rows] == sorted(row["fitness"] for row in rows)
    chosen = min(rows, key=lambda row: row["healed_kl"])
    assert [block["intermediate_size"] for block in figures["layers"]] == [
        keep[2] for keep in trials[chosen["trial"]].user_attrs["keeps"]]
    assert not (out / "heal-select").exists() or not any((out / "heal-select").iterdir())

    again = run_cli(*[a for a in args if a != "--json"], "--resume", "--json")  # the heal is done: refused
    assert again.returncode == 2 and "already exists" in again.stderr
    study = optuna.load_study(study_name=figures["study"]["name"], storage=storage)
    assert len([t for t in study.trials if schema.healed_candidate(t) is not None]) == 3  # none healed twice


def test_round_targets_compose_to_the_target_of_the_original_model():
    from tyrsearch.search.rounds import round_target

    assert round_target(0.5, 2, 2, dense=100.0, start=80.0) == pytest.approx(0.375)  # 80 x 0.625 = 50
    assert round_target(0.6, 3, 3, dense=100.0, start=61.0) == pytest.approx(1 - 40 / 61)


def test_two_prune_heal_rounds_reach_the_target_from_the_first_rounds_healed_model(
        tiny_folder, text_file, tiny_space, tmp_path):
    out = tmp_path / "run"
    ran = run_cli(*search_args(tiny_folder, text_file, tiny_space, out, "--rounds", "2", "--heal-steps", "1",
                               "--heal-text", str(text_file), "--json"))
    assert ran.returncode == 0, ran.stderr
    figures = json.loads(ran.stdout)
    first, second = figures["rounds"]
    assert first["target"] == pytest.approx(0.2)
    assert second["budget"]["dense"] == first["budget"]["winner"]  # round 2 searched round 1's model
    assert second["model"] == str(out / "round-1" / "model")
    assert second["budget"]["limit"] == pytest.approx(0.6 * first["budget"]["dense"], abs=1)  # 0.4 of the original
    assert figures["budget"]["winner"] == second["budget"]["winner"] <= second["budget"]["limit"]
    assert figures["achieved_sparsity"] == pytest.approx(
        1 - (1 - first["achieved_sparsity"]) * (1 - second["achieved_sparsity"]))
    assert _shapes(out / "model") == _shapes(out / "round-2" / "model")
    assert json.loads((out / "result.json").read_text()) == figures

    ran = run_cli(*search_args(tiny_folder, text_file, tiny_space, out, "--rounds", "2", "--heal-steps", "1",
                               "--heal-text", str(text_file)))
    assert ran.returncode == 2 and "already exists" in ran.stderr and "--resume" in ran.stderr


def test_a_loaded_model_is_healed_from_a_copy_of_itself_taken_before_pruning(tiny_folder, text_file, tmp_path):
    loaded = api.load(tiny_folder)
    result = api.prune(loaded.model, tokenizer=loaded.tokenizer, sparsity=0.4, out=tmp_path / "healed",
                       calib=str(text_file), calib_seqs=4, seq_len=32, heal_steps=1, heal_text=str(text_file),
                       heal_lr=1e-3, progress=False)
    assert result.figures["heal"]["steps"] == 1 and result.model is not loaded.model
    assert _shapes(tmp_path / "healed") == _shapes(tmp_path / "healed-oneshot")
    assert _shapes(tmp_path / "healed") != {n: v.shape for n, v in api.load(tiny_folder).model.state_dict().items()}
    healed, first = (AutoModelForCausalLM.from_pretrained(f).state_dict() for f in (tmp_path / "healed",
                                                                                   tmp_path / "healed-oneshot"))
    assert any(not torch.equal(healed[name], first[name]) for name in healed)  # a teacher other than itself


@pytest.mark.parametrize(("flags", "message"), [
    (["--heal-text", "code"], "--heal-text 'code' trains on held-out text"),
    (["--heal-lr", "0"], "--heal-lr must be a number > 0"),
    (["--heal-text", "no/such/file.txt"], "not found"),
])
def test_bad_heal_input_is_one_line_exit_2_and_writes_nothing(flags, message, tiny_folder, text_file, tmp_path):
    out = tmp_path / "out"
    ran = run_cli("prune", "--model", str(tiny_folder), "--sparsity", "0.4", "--calib", str(text_file),
                  "--calib-seqs", "4", "--seq-len", "32", "--out", str(out), "--heal-steps", "2", *flags)
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 2 and len(lines) == 1 and message in lines[0], ran.stderr
    assert not any(tmp_path.iterdir())

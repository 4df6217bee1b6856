"""The Python API: the same results as the CLI with the same settings (search, prune, stun), a loaded model in
place of a reference, errors that name the parameter (the CLI its flag), and the README's Python example."""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import tyrsearch
from tests.conftest import MOE_FAMILIES, run_cli, search_args
from tyrsearch.models import adapter_for

README = Path(__file__).resolve().parents[1] / "README.md"


def test_search_through_the_api_equals_the_cli(tiny_folder, text_file, tiny_space, tmp_path):
    cli_out, api_out = tmp_path / "cli" / "run", tmp_path / "api" / "run"
    ran = run_cli(*search_args(tiny_folder, text_file, tiny_space, cli_out, "--json"))
    assert ran.returncode == 0, ran.stderr
    found = tyrsearch.search(str(tiny_folder), target=0.4, out=api_out, space=tiny_space, calib=str(text_file),
                             calib_seqs=4, seq_len=32, supernet_dir=api_out.parent / "nets", progress=False)
    by_cli = json.loads(ran.stdout)
    assert found.to_json() == json.loads((api_out / "result.json").read_text())  # result.json is to_json()
    same = ("layers", "achieved_sparsity", "fitness", "budget", "params_after", "calibration", "config")
    assert {k: found.to_json()[k] for k in same} == {k: by_cli[k] for k in same}

    def untimed(result: dict) -> list[dict]:
        return [{k: v for k, v in it.items() if k != "evaluation_seconds"} for it in result["iterations"]]

    assert untimed(found.to_json()) == untimed(by_cli)  # the same trials won, with the same fitness
    assert found.to_json()["study"]["trials"] == by_cli["study"]["trials"]
    assert tyrsearch.evaluate(found.out / "model", text=str(text_file), seq_len=32, max_tokens=64,
                              progress=False).decoder_params == by_cli["decoder_params_after"]


def test_prune_takes_a_loaded_model_and_matches_the_cli(tiny_folder, text_file, tmp_path):
    settings = {"sparsity": 0.3, "criterion": "wanda", "calib": str(text_file), "calib_seqs": 4, "seq_len": 32}
    ran = run_cli("prune", "--model", str(tiny_folder), "--criterion", "wanda", "--sparsity", "0.3", "--calib",
                  str(text_file), "--calib-seqs", "4", "--seq-len", "32", "--out", str(tmp_path / "cli"), "--json")
    assert ran.returncode == 0, ran.stderr
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    pruned = tyrsearch.prune(model, tokenizer=AutoTokenizer.from_pretrained(tiny_folder), progress=False, **settings)
    assert pruned.out is None and not (tmp_path / "api").exists()  # nothing saved without `out`
    assert pruned.model is model  # pruned in place
    assert pruned.to_json()["layers"] == json.loads(ran.stdout)["layers"]
    assert pruned.achieved_sparsity == pytest.approx(0.3, abs=0.02)


def test_errors_name_the_parameter_and_the_cli_its_flag(tiny_folder, text_file, tmp_path):
    with pytest.raises(tyrsearch.ParameterError, match=r"^target must be in \[0, 1\)") as raised:
        tyrsearch.search(str(tiny_folder), target=1.2, out=tmp_path / "o")
    assert raised.value.parameter == "target"
    with pytest.raises(tyrsearch.ParameterError, match="^tokenizer is needed with a loaded model"):
        tyrsearch.prune(AutoModelForCausalLM.from_pretrained(tiny_folder), sparsity=0.3)
    with pytest.raises(tyrsearch.ParameterError, match="^out .* choose a new folder or pass overwrite$"):
        tyrsearch.prune(str(tiny_folder), sparsity=0.3, out=tiny_folder)
    ran = run_cli("prune", "--model", str(tiny_folder), "--sparsity", "0.3", "--out", str(tiny_folder))
    assert ran.returncode == 2 and ran.stderr.startswith("error: --out ") and "pass --overwrite" in ran.stderr
    assert not (tmp_path / "o").exists()


def test_export_takes_a_model_alias_like_every_command(tmp_path):
    ran = run_cli("export", "--model", "smollm2-135m", "--out", str(tmp_path / "model.txt"))
    assert ran.returncode == 2 and "--out" in ran.stderr and "must name a .onnx file" in ran.stderr, ran.stderr


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    example = re.search(r"## Python\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    before, after = map(float, re.search(r"code ppl ([\d.]+) -> ([\d.]+)", printed).groups())
    assert 1 < before < after  # the pruned model is worse than the dense one, not broken
    assert (tmp_path / "runs" / "owl-0.3" / "config.json").exists()


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory, smollm2_folder):
    """The tiny Mixtral (2 layers x 6 experts, top-2) with SmolLM2's tokenizer, saved as an HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    folder = tmp_path_factory.mktemp("mixtral") / "model"
    MOE_FAMILIES["mixtral"](vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_stun_through_the_api_equals_the_cli(mixtral_folder, text_file, tmp_path):
    flags = ["--experts-keep", "0.75", "--sparsity", "0.5", "--router-weight", "0.2", "--merge", "--calib",
             str(text_file), "--calib-seqs", "4", "--seq-len", "32", "--eval-text", str(text_file), "--eval-tokens",
             "64"]
    ran = run_cli("stun", "--model", str(mixtral_folder), "--out", str(tmp_path / "cli"), *flags, "--json")
    assert ran.returncode == 0, ran.stderr
    by_cli = json.loads(ran.stdout)
    model = AutoModelForCausalLM.from_pretrained(mixtral_folder)  # a loaded model, pruned in place
    pruned = tyrsearch.stun(model, tokenizer=AutoTokenizer.from_pretrained(mixtral_folder), out=tmp_path / "api",
                            experts_keep="0.75", sparsity=0.5, router_weight=0.2, merge=True, calib=str(text_file),
                            calib_seqs=4, seq_len=32, eval_text=str(text_file), eval_tokens=64, progress=False)
    assert isinstance(pruned, tyrsearch.PruneResult) and pruned.model is model
    assert pruned.to_json() == json.loads((tmp_path / "api" / "result.json").read_text())
    untimed = set(by_cli) - {"model", "out", "time_s"}
    assert set(pruned.to_json()) == set(by_cli)
    assert {k: pruned.to_json()[k] for k in untimed} == {k: by_cli[k] for k in untimed}
    assert pruned.achieved_sparsity == pytest.approx(0.5, abs=1e-3) and pruned.to_json()["experts_kept"] == 9


def test_moe_errors_name_the_parameter_before_loading_and_the_cli_its_flag(mixtral_folder, text_file, tmp_path):
    with pytest.raises(tyrsearch.ParameterError, match=r"^experts_keep 1.5 as a share must be in \(0, 1\]") as bad:
        tyrsearch.stun("no/such/model", out=tmp_path / "o", experts_keep=1.5, sparsity=0.5)  # before the load
    assert bad.value.parameter == "experts_keep"
    ran = run_cli("stun", "--model", str(mixtral_folder), "--out", str(tmp_path / "o"), "--experts-keep", "1.5",
                  "--sparsity", "0.5")
    assert ran.returncode == 2 and ran.stderr.startswith("error: --experts-keep 1.5 as a share must be in (0, 1]")
    with pytest.raises(tyrsearch.ParameterError, match=r"^top_k 5 must be between 1 and experts \(4\)$"):
        tyrsearch.moefy("no/such/model", experts=4, top_k=5, out=tmp_path / "o")
    with pytest.raises(tyrsearch.ParameterError, match="^lr must be a number > 0") as bad:
        tyrsearch.distill("no/such/model", "no/such/student", out=tmp_path / "o", lr=0.0)
    with pytest.raises(tyrsearch.ParameterError, match="^train 'some'"):
        tyrsearch.distill("no/such/model", "no/such/student", out=tmp_path / "o", train="some")
    assert not (tmp_path / "o").exists()


MOE_SPACE = ("family: moe\nunits:\n  experts: {min_keep: 2, step: 1}\nlevels: 1\niterations: 1\ngenerations: 2\n"
             "offspring: 4\nselection:\n  - {survivors: 4, tokens: 32}\n  - {survivors: 1, tokens: 64}\n"
             "fitness: {metric: kl, top_k: 16}\n")


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_search_runs_on_every_moe_family_whatever_its_config_says_of_head_dim(family, smollm2_folder, text_file,
                                                                            tmp_path):
    """Mixtral's head_dim is None, Qwen2-MoE's and OLMoE's configs have none: the adapter supplies it."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = MOE_FAMILIES[family](vocab=len(tokenizer))
    assert getattr(model.config, "head_dim", None) is None
    experts = sum(shape.experts for shape in adapter_for(model).shapes(model))
    space = tmp_path / "moe.yaml"
    space.write_text(MOE_SPACE)
    found = tyrsearch.search(model, tokenizer=tokenizer, target=0.2, out=tmp_path / "run", space=space,
                             criterion="stun", calib=str(text_file), calib_seqs=4, seq_len=32,
                             supernet_dir=tmp_path / "nets", progress=False)
    assert sum(layer.get("num_experts", 0) for layer in found.layers) < experts
    assert found.achieved_sparsity == pytest.approx(0.2, abs=0.08)
    reloaded = AutoModelForCausalLM.from_pretrained(found.out / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == found.to_json()["params_after"]

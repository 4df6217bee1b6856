"""MoEfication (`tyrsearch.moe`, `tyrsearch moefy`): balanced clusters, the Mixtral it builds, that it
computes the dense function when every expert is active, that its router and refit earn their keep,
save / reload, and the command's one-line errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from tests.conftest import VOCAB, run_cli, tiny_gemma3, tiny_llama
from tyrsearch.moe import MoefyConfig, active_params, moefy, save_moe
from tyrsearch.moe.moefy import balanced_kmeans


@pytest.fixture(scope="module")
def dense():
    return tiny_llama(layers=3)


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def held_out():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(4))


def _mse_to_dense(model, dense, tokens) -> float:
    with torch.no_grad():
        return (model(tokens).logits - dense(tokens).logits).pow(2).mean().item()


def test_balanced_kmeans_is_a_balanced_partition_that_finds_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen)
    points = centres.repeat_interleave(12, dim=0) + 0.05 * torch.randn(48, 16, generator=gen)  # 4 x 12
    shuffle = torch.randperm(48, generator=gen)
    labels = balanced_kmeans(points[shuffle], 4, seed=1)
    assert labels.shape == (48,) and labels.bincount(minlength=4).tolist() == [12] * 4
    truth = torch.arange(4).repeat_interleave(12)[shuffle]
    assert all(truth[labels == c].unique().numel() == 1 for c in range(4))  # every cluster is one planted group


def test_balanced_kmeans_refuses_unequal_clusters():
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_kmeans(torch.randn(10, 3), 4)


def test_moefied_model_is_a_mixtral_with_the_dense_attention_and_a_partition_of_the_mlp(dense, calibration):
    moe = moefy(dense, calibration, experts=4, top_k=2, progress=False)
    assert isinstance(moe, MixtralForCausalLM)
    config, dense_config = moe.config, dense.config
    assert (config.num_local_experts, config.num_experts_per_tok, config.intermediate_size) == (4, 2, 16)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "rope_parameters", "rms_norm_eps", "vocab_size", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(dense_config, field), field
    dense_state = dense.state_dict()
    for name, tensor in moe.state_dict().items():
        if ".mlp." not in name:
            assert torch.equal(tensor, dense_state[name]), name
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers, strict=True):
        gate_up = moe_layer.mlp.experts.gate_up_proj  # [E, 2m, H]
        assert gate_up.shape == (4, 32, 48) and moe_layer.mlp.experts.down_proj.shape == (4, 48, 16)
        assert moe_layer.mlp.gate.weight.shape == (4, 48)
        gates, ups = gate_up[:, :16].reshape(64, 48), gate_up[:, 16:].reshape(64, 48)
        # every dense neuron lands in exactly one expert, with its gate and up rows together
        match = (gates[:, None] == dense_layer.mlp.gate_proj.weight[None]).all(-1)  # [64 moe, 64 dense]
        assert match.sum(0).tolist() == [1] * 64 and match.sum(1).tolist() == [1] * 64
        owner = match.float().argmax(1)
        assert torch.equal(ups, dense_layer.mlp.up_proj.weight[owner])


def test_with_every_expert_active_the_moe_computes_the_dense_model(dense, held_out, calibration):
    moe = moefy(dense, calibration, experts=4, top_k=4, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(moe(held_out).logits, dense(held_out).logits, atol=1e-5, rtol=1e-5)
    assert active_params(moe) == sum(p.numel() for p in moe.parameters())


def test_fitted_router_and_refit_beat_a_misrouted_moe_and_no_refit(dense, calibration, held_out):
    fitted = moefy(dense, calibration, experts=4, top_k=2, progress=False)
    unrefit = moefy(dense, calibration, experts=4, top_k=2, options=MoefyConfig(refit=False), progress=False)
    misrouted = moefy(dense, calibration, experts=4, top_k=2, options=MoefyConfig(refit=False), progress=False)
    with torch.no_grad():
        for layer in misrouted.model.layers:  # each expert gets another's router row: same scale, wrong choices
            layer.mlp.gate.weight.copy_(layer.mlp.gate.weight.roll(1, dims=0))
    errors = [_mse_to_dense(m, dense, held_out) for m in (fitted, unrefit, misrouted)]
    assert errors[0] < errors[1] < errors[2], errors


def test_active_params_count_only_the_selected_experts(dense, calibration):
    moe = moefy(dense, calibration, experts=4, top_k=1, progress=False)
    experts = sum(p.numel() for layer in moe.model.layers for p in layer.mlp.experts.parameters())
    assert active_params(moe) == sum(p.numel() for p in moe.parameters()) - experts * 3 // 4


def test_the_dense_model_is_left_unchanged(calibration):
    model, reference = tiny_llama(layers=2), tiny_llama(layers=2)
    moefy(model, calibration, experts=2, top_k=1, progress=False)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_saved_moe_reloads_with_auto_class(dense, calibration, held_out, tmp_path):
    moe = moefy(dense, calibration, experts=4, top_k=2, progress=False)
    save_moe(moe, None, tmp_path / "moe", result={"top_k": 2})
    assert json.loads((tmp_path / "moe" / "result.json").read_text()) == {"top_k": 2}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert isinstance(reloaded, MixtralForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(held_out).logits, moe(held_out).logits)


# ---------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_folder):
    """Tiny random Llama and Gemma-3 models with SmolLM2's real tokenizer, saved as HF folders."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    root = tmp_path_factory.mktemp("moefy")
    for name, factory in (("llama", tiny_llama), ("gemma3", tiny_gemma3)):
        model = factory(vocab=len(tokenizer)) if name == "llama" else factory()
        if name == "gemma3":
            model.resize_token_embeddings(len(tokenizer))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    text = root / "text.txt"
    text.write_text(" ".join(f"The river {i} flows into the sea near the old town." for i in range(400)))
    return root


def _moefy_args(folders, out, **overrides):
    args = {"--model": str(folders / "llama"), "--experts": "4", "--top-k": "2", "--out": str(out),
            "--calibration": str(folders / "text.txt"), "--calibration-sequences": "4", "--seq-len": "32",
            "--eval-text": str(folders / "text.txt"), "--eval-tokens": "128"}
    args.update(overrides)
    return ["moefy", *[x for kv in args.items() for x in kv]]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"--experts": "1"}, "at least 2 experts"),
    ({"--top-k": "5"}, "--top-k 5 must be between 1 and --experts (4)"),
    ({"--top-k": "0"}, "--top-k 0 must be between 1"),
    ({"--experts": "3", "--top-k": "1"}, "not divisible into 3 equal experts"),
    ({"--model": "gemma3"}, "this model is 'gemma3_text'"),
    ({"--model": "no/such/folder"}, "not found"),
    ({"--calibration": "no/such/text.txt"}, "not found"),
])
def test_bad_moefy_input_is_one_line_exit_2_and_writes_nothing(overrides, message, folders, tmp_path):
    if overrides.get("--model") == "gemma3":
        overrides["--model"] = str(folders / "gemma3")
    result = run_cli(*_moefy_args(folders, tmp_path / "out", **overrides))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_moefy_refuses_a_used_out_dir(folders, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    result = run_cli(*_moefy_args(folders, used))
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr
    assert (used / "keep.txt").read_text() == "mine"


def test_moefy_command_writes_a_loadable_mixtral_and_reports_both_perplexities(folders, tmp_path):
    out = tmp_path / "moe"
    result = run_cli(*_moefy_args(folders, out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "result.json").read_text())
    assert (summary["experts"], summary["top_k"], summary["eval_tokens"]) == (4, 2, 4 * 31)
    assert summary["ppl_ratio"] == pytest.approx(summary["moe_ppl"] / summary["dense_ppl"])
    assert 0.5 < summary["active_fraction"] < 1 and summary["active_params"] < summary["params"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    evaluated = run_cli("eval", "--model", str(out), "--text", str(folders / "text.txt"), "--seq-len", "32",
                        "--max-tokens", "128", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["ppl"] == pytest.approx(summary["moe_ppl"], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# integration: the real SmolLM2


@pytest.mark.integration
def test_smollm2_with_every_expert_active_is_the_dense_model():
    from tyrsearch.assets import load_model
    from tyrsearch.data import calibration_batches
    from tyrsearch.texts import read_text

    model, tokenizer = load_model("smollm2-135m")
    batches = calibration_batches(tokenizer, read_text("c4")[:20000], seq_len=64, count=2)
    moe = moefy(model, batches, experts=8, top_k=8, progress=False)
    assert moe.config.intermediate_size == 1536 // 8
    assert moe.config.rope_parameters == model.config.rope_parameters
    with torch.no_grad():
        torch.testing.assert_close(moe(batches).logits, model(batches).logits, atol=1e-3, rtol=1e-4)

"""The engine on the real SmolLM2-135M, with small token counts."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tyrsearch import assets, data, metrics, texts
from tyrsearch.materialize import save_pruned
from tyrsearch.models import LayerShape, adapter_for
from tyrsearch.pruner import OneShotConfig, one_shot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return assets.load_model("smollm2-135m")


def test_smollm2_units_are_found(smollm2):
    model, _ = smollm2
    shapes = adapter_for(model).shapes(model)
    assert shapes == [LayerShape(kv_heads=3, q_per_kv=3, intermediate=1536)] * 30


def test_prune_reload_eval(smollm2, tmp_path):
    dense, tokenizer = smollm2
    calib = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=256, count=8, seed=0)
    heldout = data.eval_batches(tokenizer, texts.read_text("wiki-summaries"), seq_len=256, max_tokens=1024)
    dense_ppl = metrics.perplexity(dense, heldout, progress=False)["ppl"]

    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model("smollm2-135m")).eval()
    # wanda: osscar on the real model is tests/test_placement.py's (4 layers, float32 and bfloat16)
    report = one_shot(model, OneShotConfig(criterion="wanda", sparsity=0.3), calib, progress=False)
    assert abs(report["achieved_sparsity"] - 0.3) < 0.005
    assert metrics.decoder_params(model) < 0.71 * metrics.decoder_params(dense)
    folder = save_pruned(model, tokenizer, tmp_path / "smol-30")
    reloaded, _ = assets.load_model(str(folder))
    with torch.no_grad():
        assert torch.equal(reloaded(heldout[:1]).logits, model(heldout[:1]).logits)
    pruned_ppl = metrics.perplexity(reloaded, heldout, progress=False)["ppl"]
    # 2k calibration tokens only (benchmark: 16k): far from the benchmark's quality, but from collapse too
    # (magnitude pruning gives ppl > 1e6 here)
    assert dense_ppl < pruned_ppl < 10 * dense_ppl


def test_search_on_smollm2_writes_a_reloadable_winner(tmp_path):
    """The whole search command on the real model, kept small: one iteration, one generation of two."""
    import json

    from tests.conftest import run_cli

    space = tmp_path / "small.yaml"
    space.write_text("family: llama\nunits:\n  q_heads: {min_keep: 0, step: 1}\n  mlp: {min_keep: 0, step: 256}\n"
                     "levels: 1\niterations: 1\ngenerations: 1\noffspring: 2\n"
                     "selection:\n  - {survivors: 2, tokens: 256}\n  - {survivors: 1, tokens: 512}\n"
                     "fitness: {metric: kl, top_k: 64}\n")
    out = tmp_path / "run"
    result = run_cli("search", "--model", "smollm2-135m", "--space", str(space), "--target", "0.3",
                     "--criterion", "wanda", "--start", "centre", "--calib-seqs", "4", "--seq-len", "256",
                     "--out", str(out),
                     "--supernet-dir", str(tmp_path / "nets"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert abs(summary["achieved_sparsity"] - 0.3) < 0.01 and summary["study"]["trials"] == 3
    assert summary["iterations"][0]["fitness"] <= summary["iterations"][0]["start_fitness"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    shapes = adapter_for(reloaded).shapes(reloaded)
    assert [s.intermediate for s in shapes] == [b["intermediate_size"] for b in summary["layers"]]
    assert metrics.decoder_params(reloaded) == summary["decoder_params_after"]
    assert (out / "report.html").stat().st_size > 1000


def test_prune_and_heal_on_smollm2_lowers_the_held_out_perplexity(tmp_path):
    """`prune` with two heal steps (2 x 4 x 128 tokens of c4 and wiki): the healed model reloads with the
    one-shot model's shapes and is closer to the dense model on held-out text."""
    from tyrsearch import api

    out = tmp_path / "healed"
    result = api.prune("smollm2-135m", sparsity=0.3, criterion="wanda", calib_seqs=4, seq_len=128, out=out,
                       eval_text="wiki-summaries", eval_tokens=1024, heal_steps=2, heal_lr=3e-4, progress=False)
    before = result.figures["held_out"]["wiki-summaries"]["ppl"]
    after = result.figures["heal"]["held_out"]["wiki-summaries"]["ppl"]
    assert after < 0.95 * before, (before, after)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert adapter_for(reloaded).shapes(reloaded) == adapter_for(result.model).shapes(result.model)
    oneshot = AutoModelForCausalLM.from_pretrained(tmp_path / "healed-oneshot")
    assert adapter_for(oneshot).shapes(oneshot) == adapter_for(reloaded).shapes(reloaded)


@pytest.fixture(scope="module")
def smollm2_shaped(smollm2, tmp_path_factory):
    """SmolLM2 cut to per-layer shapes: layer 0 without attention, 1 and 2 KV groups in layers 1 and 2, MLPs
    of 768 and 1024 channels (wanda, 4 x 128 calibration tokens)."""
    from tyrsearch.local import make_criterion
    from tyrsearch.pruner import prune

    _, tokenizer = smollm2
    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model("smollm2-135m")).eval()
    plan = [LayerShape(kv_heads=3, q_per_kv=3, intermediate=1024)] * 30
    plan[:3] = [LayerShape(kv_heads=3, q_per_kv=0, intermediate=1024), LayerShape(kv_heads=1, q_per_kv=3,
                                                                                   intermediate=1024),
                LayerShape(kv_heads=2, q_per_kv=2, intermediate=768)]
    calib = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=128, count=4, seed=0)
    prune(model, plan, make_criterion("wanda"), calib, progress=False)
    return save_pruned(model, tokenizer, tmp_path_factory.mktemp("shaped") / "model")


def _folder(shaped: bool, request) -> str:
    return str(request.getfixturevalue("smollm2_shaped") if shaped else assets.resolve_model("smollm2-135m"))


def test_smollm2_exports_generate_torchs_tokens_in_onnxruntime_genai(smollm2_shaped, tmp_path):
    """The --kv-cache folder as onnxruntime-genai loads it (og.Model / og.Generator): 32 greedy tokens equal to
    torch's, per-layer (27 of its 30 layers dense). The dense SmolLM2 runs the same path without the per-layer
    shapes; it is left to benchmarks/edge.py, which verifies it on every run, since each export of the whole
    model costs about two and a half minutes of CI's test budget."""
    import json

    from tests.conftest import run_cli

    ran = run_cli("export", "--model", str(smollm2_shaped), "--out", str(tmp_path / "onnx" / "model.onnx"),
                  "--kv-cache", "--json")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["verified"], report["verification"]
    assert report["verification"]["genai"] == {"tokens": 32, "equal_to_torch": True, "first_difference": None}


@pytest.mark.parametrize("shaped", [False, True], ids=["dense", "per-layer"])
def test_smollm2_gguf_runs_in_llama_cpp_as_in_torch(shaped, request, tmp_path):
    """f32 GGUF in llama.cpp: 32 greedy tokens equal to torch's and held-out perplexity within 1%; the
    per-layer model as llama.cpp's deci architecture, its first layer without attention."""
    import json

    from tests.conftest import run_cli

    ran = run_cli("export", "--model", _folder(shaped, request), "--format", "gguf", "--quant", "f32", "--out",
                  str(tmp_path / "model.gguf"), "--json")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["verified"] and report["architecture"] == ("deci" if shaped else "llama")
    check = report["verification"]
    assert check["generation"]["equal_to_torch"] and abs(check["held_out"]["ppl_ratio"] - 1) < 0.01
    if shaped:
        assert report["head_count"][:3] == [9, 3, 4] and report["head_count_kv"][:3] == [0, 1, 2]

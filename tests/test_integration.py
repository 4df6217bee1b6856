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
    report = one_shot(model, OneShotConfig(criterion="osscar", sparsity=0.3), calib, progress=False)
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
    """`prune` with two heal steps (2 x 4 x 256 tokens of c4 and wiki): the healed model reloads with the
    one-shot model's shapes and is closer to the dense model on held-out text."""
    from tyrsearch import api

    out = tmp_path / "healed"
    result = api.prune("smollm2-135m", sparsity=0.3, criterion="wanda", calib_seqs=4, seq_len=256, out=out,
                       eval_text="wiki-summaries", eval_tokens=1024, heal_steps=2, heal_lr=3e-4, progress=False)
    before = result.figures["held_out"]["wiki-summaries"]["ppl"]
    after = result.figures["heal"]["held_out"]["wiki-summaries"]["ppl"]
    assert after < 0.95 * before, (before, after)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert adapter_for(reloaded).shapes(reloaded) == adapter_for(result.model).shapes(result.model)
    oneshot = AutoModelForCausalLM.from_pretrained(tmp_path / "healed-oneshot")
    assert adapter_for(oneshot).shapes(oneshot) == adapter_for(reloaded).shapes(reloaded)

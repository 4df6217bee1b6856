"""The engine on the real SmolLM2-135M, with small token counts."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tyrsearch import assets, data, evaluate
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
    calib = data.calibration_batches(tokenizer, assets.read_text("c4"), seq_len=256, count=8, seed=0)
    heldout = data.eval_batches(tokenizer, assets.read_text("wiki-summaries"), seq_len=256, max_tokens=1024)
    dense_ppl = evaluate.perplexity(dense, heldout, progress=False)["ppl"]

    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model("smollm2-135m")).eval()
    report = one_shot(model, OneShotConfig(criterion="osscar", sparsity=0.3), calib, progress=False)
    assert abs(report["achieved_sparsity"] - 0.3) < 0.005
    assert evaluate.decoder_params(model) < 0.71 * evaluate.decoder_params(dense)
    folder = save_pruned(model, tokenizer, tmp_path / "smol-30")
    reloaded, _ = assets.load_model(str(folder))
    with torch.no_grad():
        assert torch.equal(reloaded(heldout[:1]).logits, model(heldout[:1]).logits)
    pruned_ppl = evaluate.perplexity(reloaded, heldout, progress=False)["ppl"]
    # 2k calibration tokens only (benchmark: 16k): far from the benchmark's quality, but from collapse too
    # (magnitude pruning gives ppl > 1e6 here)
    assert dense_ppl < pruned_ppl < 10 * dense_ppl

"""Pruned models save as per-layer-shaped HF folders and reload identically, by both loading paths."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import FAMILIES, tiny_llama
from tyrsearch.local import make_criterion
from tyrsearch.materialize import save_pruned, to_pruned
from tyrsearch.models import LayerShape, adapter_for
from tyrsearch.pruner import OneShotConfig, one_shot, prune


def _pruned(name, tokens):
    model = FAMILIES[name]()
    attention = {"llama": 0.4, "gemma3": 0.25, "qwen2": 0.5}[name]
    one_shot(model, OneShotConfig(criterion="flap", sparsity=0.4, attention_sparsity=attention), tokens,
             progress=False)
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_save_reload_gives_equal_logits(name, tokens, tmp_path):
    model = _pruned(name, tokens)
    before = model(tokens).logits
    folder = save_pruned(model, None, tmp_path / "pruned", result={"note": "x"})
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"tyr_{model.config.model_type}"
    assert len(config["block_configs"]) == model.config.num_hidden_layers
    assert config["block_configs"][0]["down_proj_bias"] is True  # FLAP's bias compensation is kept
    assert (folder / "modeling_tyr.py").exists() and json.loads((folder / "result.json").read_text()) == {"note": "x"}
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded).__name__.startswith("Tyr")
    assert torch.equal(reloaded(tokens).logits, before)
    assert adapter_for(reloaded).shapes(reloaded) == adapter_for(model).shapes(model)


def test_trust_remote_code_loads_without_tyrsearch(tokens, tmp_path):
    model = _pruned("llama", tokens)
    folder = save_pruned(model, None, tmp_path / "pruned")
    torch.save(tokens, tmp_path / "tokens.pt")
    torch.save(model(tokens).logits, tmp_path / "logits.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert "tyrsearch" not in sys.modules, "tyrsearch was imported"
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
tokens = torch.load({str(tmp_path / 'tokens.pt')!r}, weights_only=True)
expected = torch.load({str(tmp_path / 'logits.pt')!r}, weights_only=True)
print(float((m(tokens).logits - expected).abs().max()))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) == 0.0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_generate_with_cache_matches_full_forward(name, attention, tokens):
    """KV-cached greedy decoding must equal argmax of full forwards, also with a skipped attention block
    as layer 0 (whose cache counts the positions) and with eager attention's explicit masks."""
    model = FAMILIES[name]()
    model.set_attn_implementation(attention)
    adapter = adapter_for(model)
    plan = adapter.shapes(model)
    plan[0] = LayerShape(kv_heads=plan[0].kv_heads, q_per_kv=0, intermediate=plan[0].intermediate // 2)  # no attention
    prune(model, plan, make_criterion("wanda"), tokens, progress=False)
    model = to_pruned(model)
    prompt = tokens[:1, :6]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                               pad_token_id=0)
    sequence = prompt
    for _ in range(8):
        next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


def test_save_is_atomic_and_replaces(tmp_path, tokens):
    model = tiny_llama()
    target = tmp_path / "out"
    save_pruned(model, None, target)
    save_pruned(model, None, target)  # replacing an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind

"""GGUF export for llama.cpp (`tyrsearch export --format gguf`): the architecture and per-layer arrays it
writes, the tensors a layer without attention leaves out, the rope permutation, llama.cpp's verification
(llama-cpp-python) at every quantization, and one-line errors."""

import json

import gguf
import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import run_cli, tiny_llama
from tyrsearch.exporters.gguf_export import permute_rope
from tyrsearch.local import make_criterion
from tyrsearch.materialize import save_pruned
from tyrsearch.models import LayerShape, adapter_for
from tyrsearch.pruner import prune


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_folder):
    """A tiny Llama with SmolLM2's tokenizer, dense and cut to per-layer shapes (layer 0 without attention,
    the last with one KV group, every MLP its own width)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    root = tmp_path_factory.mktemp("gguf")
    dense = tiny_llama(vocab=len(tokenizer))
    save_pruned(dense, tokenizer, root / "dense")
    plan = [LayerShape(kv_heads=d.kv_heads, q_per_kv=0 if i == 0 else d.q_per_kv, intermediate=64 - 16 * i)
            for i, d in enumerate(adapter_for(dense).shapes(dense))]
    plan[-1] = LayerShape(kv_heads=1, q_per_kv=plan[-1].q_per_kv, intermediate=plan[-1].intermediate)
    calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    prune(dense, plan, make_criterion("wanda"), calib, progress=False)
    save_pruned(dense, tokenizer, root / "shaped")
    return root


def _export(folder, out, *flags):
    ran = run_cli("export", "--model", str(folder), "--format", "gguf", "--out", str(out), "--json", *flags)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    values = [field.parts[i].tolist() for i in field.data]
    return [v[0] for v in values] if len(values) > 1 or key.endswith(("_count", "_length")) else values[0][0]


def test_rope_permutation_interleaves_each_heads_halves():
    weight = torch.arange(2 * 8, dtype=torch.float32).reshape(8, 2)  # 2 heads of dim 4, 2 input columns
    rows = permute_rope(weight, heads=2)[:, 0].tolist()
    assert rows == [0, 4, 2, 6, 8, 12, 10, 14]  # (x0, x2, x1, x3) of each head: rotate-half pairs side by side


def test_a_per_layer_model_is_written_as_deci_with_per_layer_arrays(folders, tmp_path):
    report = _export(folders / "shaped", tmp_path / "model.gguf", "--quant", "f32")
    assert report["architecture"] == "deci" and report["verified"], report.get("verification")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "deci"
    # layer 0 has no attention: llama.cpp reads the head size from layer 0's head count, so it is written as
    # deci's linear-attention layer (heads, no KV heads) whose one matrix is zeros
    assert _field(reader, "deci.attention.head_count") == [6, 6, 3] == report["head_count"]
    assert _field(reader, "deci.attention.head_count_kv") == [0, 2, 1]
    assert _field(reader, "deci.feed_forward_length") == [64, 48, 32]
    tensors = {t.name: t for t in reader.tensors}
    assert not any(name.startswith(("blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v")) for name in tensors)
    assert not tensors["blk.0.attn_output.weight"].data.any()
    assert {"blk.1.attn_q.weight", "blk.1.attn_norm.weight", "blk.0.ffn_down.weight"} <= tensors.keys()
    assert "output.weight" not in tensors  # tied to token_embd, as llama.cpp loads it
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    check = report["verification"]
    assert check["generation"]["equal_to_torch"] and abs(check["held_out"]["ppl_ratio"] - 1) < 0.01


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_every_quantization_runs_in_llama_cpp(quant, folders, tmp_path):
    report = _export(folders / "dense", tmp_path / "model.gguf", "--quant", quant)
    assert report["architecture"] == "llama" and report["quant"] == quant
    held_out = report["verification"]["held_out"]
    assert held_out["tokens"] > 0 and 0.5 < held_out["ppl_ratio"] < 2.0
    assert report["verified"] == (report["verification"]["generation"]["equal_to_torch"] or quant not in ("f16",))


@pytest.mark.parametrize(("flags", "message"), [
    (["--int8"], "--int8 is for --format onnx"),
    (["--quant", "q3"], "'q3' is not one of"),
])
def test_bad_gguf_input_is_one_line_exit_2(flags, message, folders, tmp_path):
    ran = run_cli("export", "--model", str(folders / "dense"), "--format", "gguf", "--out",
                  str(tmp_path / "model.gguf"), *flags)
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 2 and message in ran.stderr and len(lines) == 1, ran.stderr
    assert not list(tmp_path.iterdir())
    ran = run_cli("export", "--model", str(folders / "dense"), "--format", "gguf", "--out", str(tmp_path / "m.onnx"))
    assert ran.returncode == 2 and "must name a .gguf file" in ran.stderr


def test_a_middle_layer_without_attention_is_an_attention_free_deci_layer(smollm2_folder, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = tiny_llama(vocab=len(tokenizer))
    plan = [LayerShape(kv_heads=d.kv_heads, q_per_kv=0 if i == 1 else d.q_per_kv, intermediate=d.intermediate)
            for i, d in enumerate(adapter_for(model).shapes(model))]
    prune(model, plan, make_criterion("magnitude"), torch.randint(0, len(tokenizer), (2, 8)), progress=False)
    save_pruned(model, tokenizer, tmp_path / "model")
    report = _export(tmp_path / "model", tmp_path / "model.gguf", "--quant", "f32")
    assert report["verified"] and (report["head_count"], report["head_count_kv"]) == ([6, 0, 6], [2, 0, 2])
    names = {t.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert not any(name.startswith("blk.1.attn") for name in names)


def test_a_runner_without_all_logits_generates_the_same_tokens(folders, tmp_path):
    from tyrsearch.exporters import llamacpp

    _export(folders / "shaped", tmp_path / "model.gguf", "--quant", "f32")
    prompt = list(range(100, 116))
    every = llamacpp.Runner(tmp_path / "model.gguf", context=64)
    last_only = llamacpp.Runner(tmp_path / "model.gguf", context=64, all_logits=False)
    assert every.logits(prompt).shape == (16, 49152)
    assert last_only.greedy(prompt, 8) == every.greedy(prompt, 8)

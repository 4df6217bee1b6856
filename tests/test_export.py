"""ONNX export of tiny random Llama and Gemma-3 models, dense and per-layer shaped (one layer without
attention), prefill and KV-cache graphs, fp32 and int8: verified in ONNX Runtime against torch; the
torch-free runtime generates torch's tokens; bad input is one line with exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from tests.conftest import run_cli, tiny_llama
from tyrsearch.local import make_criterion
from tyrsearch.materialize import save_pruned
from tyrsearch.models import LayerShape, adapter_for
from tyrsearch.pruner import prune


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return AutoTokenizer.from_pretrained(smollm2_folder)


def _gemma3(vocab: int) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


def _folder(tmp_path_factory, tokenizer, family: str, shaped: bool):
    """A tiny model with SmolLM2's tokenizer, saved; `shaped`: every layer its own shape, layer 0 without
    attention."""
    model = tiny_llama(vocab=len(tokenizer)) if family == "llama" else _gemma3(len(tokenizer))
    if shaped:
        dense = adapter_for(model).shapes(model)
        plan = [LayerShape(kv_heads=d.kv_heads, q_per_kv=0 if i == 0 else max(1, d.q_per_kv - i + 1),
                           intermediate=d.intermediate - 8 * (i + 1)) for i, d in enumerate(dense)]
        if family == "llama":  # Gemma-3's adapter keeps KV groups whole
            plan[-1] = LayerShape(kv_heads=1, q_per_kv=plan[-1].q_per_kv, intermediate=plan[-1].intermediate)
        calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
        prune(model, plan, make_criterion("wanda"), calib, progress=False)
    folder = tmp_path_factory.mktemp(f"{family}-{'shaped' if shaped else 'dense'}") / "model"
    save_pruned(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def llama_shaped(tmp_path_factory, tokenizer):
    return _folder(tmp_path_factory, tokenizer, "llama", shaped=True)


def _export(folder, out, *flags):
    ran = run_cli("export", "--model", str(folder), "--out", str(out), "--json", *flags)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


@pytest.mark.parametrize(("family", "shaped"), [("llama", False), ("gemma3", True)])
def test_prefill_export_verifies_at_other_batch_and_sequence_sizes(family, shaped, tokenizer, tmp_path_factory,
                                                                  tmp_path):
    report = _export(_folder(tmp_path_factory, tokenizer, family, shaped), tmp_path / "onnx" / "model.onnx")
    check = report["verification"]
    assert report["verified"] and check["passed"] and check["checker"] == "passed"
    assert {(i["batch"], i["seq"]) for i in check["inputs"]} == {(1, 7), (3, 33)}  # traced at (2, 16)
    assert check["max_abs_diff"] < 1e-3 and check["argmax_agreement"] == 1.0
    folder = tmp_path / "onnx"
    for name in ("model.onnx", "config.json", "tokenizer.json", "genai_config.json", "runtime.py", "export.json"):
        assert (folder / name).is_file(), name
    assert not [p for p in folder.iterdir() if p.name.startswith(".export-")]  # the temp folder is gone
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]


def test_kv_cache_export_generates_torchs_tokens_with_per_layer_heads(llama_shaped, tmp_path):
    report = _export(llama_shaped, tmp_path / "kv" / "model.onnx", "--kv-cache", "--int8")
    assert report["verified"], report
    assert report["verification"]["generation"] == {"tokens": 32, "equal_to_torch": True, "first_difference": None}
    # onnxruntime-genai runs the folder as shipped: fp32 as torch, the int8 graph as ONNX Runtime runs it
    assert report["verification"]["genai"] == {"tokens": 32, "equal_to_torch": True, "first_difference": None}
    int8 = report["int8_verification"]
    assert int8["precision"] == "int8" and int8["passed"] and np.isfinite(int8["max_abs_diff"])
    assert int8["genai"] == {"tokens": 32, "equal_to_onnxruntime": True, "first_difference": None}
    assert report["files"]["model.int8.onnx"] < report["files"]["model.onnx"] + report["files"].get(
        "model.onnx.data", 0)
    session = ort.InferenceSession(str(tmp_path / "kv" / "model.onnx"), providers=["CPUExecutionProvider"])
    heads = [i.shape[1] for i in session.get_inputs() if i.name.startswith("past_key_values.") and
             i.name.endswith(".key")]
    assert heads == [1, 2, 1]  # layer 0 has no attention (one head of zeros); the last keeps one KV group


def test_weight_only_int8_keeps_the_perplexity(llama_shaped, tmp_path):
    report = _export(llama_shaped, tmp_path / "w" / "model.onnx", "--int8", "--int8-method", "weights")
    int8 = report["int8_verification"]
    assert report["verified"] and int8["argmax_agreement"] >= 0.9
    assert abs(int8["held_out"]["ppl_ratio"] - 1) < 0.02
    types = {n.op_type for n in onnx.load(str(tmp_path / "w" / "model.int8.onnx")).graph.node}
    assert "MatMulNBits" in types


def _float_matmuls_on_weights(path) -> list[str]:
    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer}
    return sorted(n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights)


def test_dynamic_int8_quantizes_every_matmul_of_a_smoothed_graph(llama_shaped, tmp_path):
    report = _export(llama_shaped, tmp_path / "d" / "model.onnx", "--int8")
    int8 = report["int8_verification"]
    assert report["verified"] and report["config"]["int8_method"] == "dynamic"
    assert int8["smoothing"]["alpha"] == 0.75 and int8["smoothing"]["mlps"] == 3  # one per layer
    assert int8["smoothing"]["calibration"] == {"text": "c4", "sequences": 16, "seq_len": 512}
    assert _float_matmuls_on_weights(tmp_path / "d" / "model.onnx") and not _float_matmuls_on_weights(
        tmp_path / "d" / "model.int8.onnx")  # every MatMul on a weight is int8 now
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".")]  # temp graphs are gone


def test_gemma3_kv_cache_export_generates_torchs_tokens(tokenizer, tmp_path_factory, tmp_path):
    report = _export(_folder(tmp_path_factory, tokenizer, "gemma3", shaped=True), tmp_path / "g" / "model.onnx",
                     "--kv-cache")
    assert report["verified"] and report["verification"]["generation"]["equal_to_torch"]
    assert report["verification"]["genai"]["equal_to_torch"]


def test_runtime_runner_needs_no_torch_and_generates_torchs_tokens(llama_shaped, tokenizer, tmp_path):
    _export(llama_shaped, tmp_path / "edge" / "model.onnx", "--kv-cache")
    folder = tmp_path / "edge"
    probe = ("import runpy, sys; sys.argv = ['runtime.py', sys.argv[1], '--prompt', 'The river flows', "
             "'--max-new-tokens', '12', '--json']\n"
             "try:\n    runpy.run_path(sys.argv[1] + '/runtime.py', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules or 'transformers' in sys.modules else 'NO-TORCH')")
    ran = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    result, marker = ran.stdout.strip().splitlines()
    assert marker == "NO-TORCH"
    got = json.loads(result)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_shaped).eval()
    prompt = torch.tensor([got["prompt_ids"]])
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                          pad_token_id=0)[0, prompt.shape[1]:].tolist()
    eos = model.config.eos_token_id
    assert got["new_ids"] == want[:len(got["new_ids"])] and (len(got["new_ids"]) == 12 or got["new_ids"][-1] == eos)


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "no/such/folder"], "model 'no/such/folder' not found"),  # as every command says it
    (["--opset", "9"], "--opset 9 is not supported: choose 18 to 23"),
    (["--out", "x.txt"], "must name a .onnx file"),
    (["--int8-method", "int4"], "--int8-method 'int4' is unknown: choose dynamic or weights"),
    (["--int8-smooth", "1.5"], "--int8-smooth 1.5 must be between 0 (no smoothing) and 1"),
])
def test_bad_export_input_is_one_line_exit_2(args, message, llama_shaped, tmp_path):
    base = {"--model": str(llama_shaped), "--out": str(tmp_path / "m.onnx")}
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    argv = [x for key, value in {**base, **pairs}.items() for x in (key, value)]
    ran = run_cli("export", *argv)
    assert ran.returncode == 2 and message in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()

"""Export a (pruned or dense) Llama-family decoder to one GGUF file for llama.cpp, with the `gguf` package.

Architecture: `llama` when every layer has the model's own shape (llama.cpp's llama loader sizes every layer
from one head count and one FFN length); `deci` otherwise, the loader llama.cpp has for NVIDIA's per-layer
Nemotron-NAS models: it reads `head_count`, `head_count_kv` and `feed_forward_length` as per-layer arrays and
takes layers without attention (both head counts 0; their attention tensors, norm included, are left out).
Layers without an MLP are refused (the deci loader wants the FFN tensors in every layer), as are models with
attention biases (its biases are sized for unpruned heads) and families other than Llama's.

Weights: f32, or f16 for the matrices (norms stay f32, as llama.cpp's converter keeps 1-D tensors), or q8_0
from gguf-py's reference quantizer (a matrix whose rows do not split into 32-value blocks stays f16, as
llama.cpp falls back). Q and K rows are permuted from transformers' rotate-half layout to llama.cpp's
interleaved rope pairs. The tokenizer (BPE tokens, types, merges, special ids, chat template) comes from the
model folder through `gguf.SpecialVocab`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedModel

from tyrsearch import data, metrics, texts
from tyrsearch.errors import ParameterError
from tyrsearch.exporters import llamacpp
from tyrsearch.models import adapter_for

WRITTEN = ("f32", "f16", "q8_0")  # what this module writes; k-quants are llama.cpp's quantizer's (llamacpp.py)
QUANTS = (*WRITTEN, *llamacpp.K_QUANTS)
EXACT = ("f32", "f16")  # greedy generation must equal torch's
PPL_TOLERANCE = 0.01  # f32: llama.cpp's held-out perplexity within 1% of torch's
FAMILIES = ("llama", "tyr_llama")
# llama.cpp's name for a tokenizer's pre-tokenizer regex, by the tokenizer's vocabulary size; a tokenizer
# that is not here gets "default" (ids fed to llama.cpp are unaffected; text it tokenizes itself may differ)
PRE_TOKENIZERS = {49152: "smollm"}


def permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads * head_dim, in] rows from rotate-half order (x0..x_{d/2-1}, x_{d/2}..) to interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def layer_heads(model: PreTrainedModel) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, FFN channels) of every layer as llama.cpp's deci loader reads them: (0, 0, ffn)
    for a layer without attention, except layer 0, which llama.cpp reads the head size from (it would be 0):
    there (heads, 0, ffn), deci's "linear attention" layer, whose one matrix is written as zeros."""
    heads = [(s.q_heads, s.kv_heads if s.q_heads else 0, s.intermediate) for s in adapter_for(model).shapes(model)]
    if heads[0][0] == 0:
        heads[0] = (model.config.num_attention_heads, 0, heads[0][2])
    return heads


def check_exportable(model: PreTrainedModel) -> None:
    if model.config.model_type not in FAMILIES:
        raise ParameterError("format", f"gguf is written for Llama-family models (SmolLM2, Llama, Mistral without "
                                       f"biases), not {model.config.model_type}: export it to ONNX instead")
    if any(getattr(model.config, key, False) for key in ("attention_bias", "mlp_bias")):
        raise ParameterError("format", "gguf: llama.cpp's per-layer loader sizes biases for unpruned heads; a model "
                                       "with attention or MLP biases exports to ONNX only")
    if any(ffn == 0 for _, _, ffn in layer_heads(model)):
        raise ParameterError("format", "gguf: a layer without MLP channels has no llama.cpp loader; export it to "
                                       "ONNX instead")


def write_gguf(model: PreTrainedModel, folder: Path, out_file: Path, *, quant: str) -> dict:
    """Write `model` (from `folder`, for its tokenizer) to `out_file`; returns what was written."""
    check_exportable(model)
    config, heads = model.config, layer_heads(model)
    head_dim = adapter_for(model).head_dim(model)
    uniform = len(set(heads)) == 1
    arch = "llama" if uniform else "deci"
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_name(Path(folder).name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    q, kv, ffn = (list(column) for column in zip(*heads, strict=True))
    writer.add_head_count(q[0] if uniform else q)
    writer.add_head_count_kv(kv[0] if uniform else kv)
    writer.add_feed_forward_length(ffn[0] if uniform else ffn)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    add_tokenizer(writer, folder, config.vocab_size)
    for name, tensor in tensors(model, heads):
        add_tensor(writer, name, tensor, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "quant": quant, "head_count": q, "head_count_kv": kv, "feed_forward_length": ffn}


def tensors(model: PreTrainedModel, heads: list[tuple[int, int, int]]):
    """(GGUF name, float32 tensor) of every weight llama.cpp's loader creates for these layers."""
    state = {name: value.detach().float() for name, value in model.state_dict().items()}
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    if not model.config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]
    for i, (q, kv, _) in enumerate(heads):
        prefix = f"model.layers.{i}."
        if q and not kv:  # layer 0 without attention, as a linear-attention layer adding zeros
            yield f"blk.{i}.attn_norm.weight", state[prefix + "input_layernorm.weight"]
            yield f"blk.{i}.attn_output.weight", torch.zeros(model.config.hidden_size, model.config.hidden_size)
        elif q:
            yield f"blk.{i}.attn_norm.weight", state[prefix + "input_layernorm.weight"]
            yield f"blk.{i}.attn_q.weight", permute_rope(state[prefix + "self_attn.q_proj.weight"], q)
            yield f"blk.{i}.attn_k.weight", permute_rope(state[prefix + "self_attn.k_proj.weight"], kv)
            yield f"blk.{i}.attn_v.weight", state[prefix + "self_attn.v_proj.weight"]
            yield f"blk.{i}.attn_output.weight", state[prefix + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", state[prefix + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", state[prefix + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", state[prefix + "mlp.down_proj.weight"]


def add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, quant: str) -> None:
    data = tensor.numpy()
    if data.ndim == 1 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),  # bytes [rows, ...]
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """The folder's BPE tokenizer as llama.cpp's "gpt2" model: every id up to `vocab_size` (unused ids as
    padding), added special tokens as control tokens, then merges, special ids and chat template."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS.get(vocab_size, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def export_gguf(model_dir: Path, out_file: Path, *, quant: str, generate_tokens: int = 32,
                ppl_tokens: int = 2048) -> dict:
    """Write `out_file` (quantized as `quant`) and, with llama-cpp-python installed, verify it in llama.cpp
    against torch: greedy tokens and held-out (wiki-summaries) perplexity on the same token ids."""
    from tyrsearch.exporters.onnx_export import load_for_export

    if out_file.suffix != ".gguf":
        raise ParameterError("out", f"{out_file} must name a .gguf file with --format gguf")
    if out_file.exists():
        raise ParameterError("out", f"{out_file} already exists: choose a new path or remove it")
    if quant not in QUANTS:
        raise ParameterError("quant", f"{quant!r} is unknown: choose one of {', '.join(QUANTS)}")
    if quant in llamacpp.K_QUANTS and not llamacpp.available():
        raise ParameterError("quant", f"{quant} is llama.cpp's quantizer: install llama-cpp-python (setup.sh "
                                      "builds it), or choose f32, f16 or q8_0")
    model, tokenizer = load_for_export(Path(model_dir))
    check_exportable(model)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".gguf-") as tmp_name:
        written = Path(tmp_name) / out_file.name
        if quant in llamacpp.K_QUANTS:
            report = write_gguf(model, Path(model_dir), written.with_suffix(".f16.gguf"), quant="f16")
            llamacpp.quantize(written.with_suffix(".f16.gguf"), written, quant)
            report["quant"] = quant
        else:
            report = write_gguf(model, Path(model_dir), written, quant=quant)
        report = {"model": str(model_dir), "format": "gguf", **report, "bytes": written.stat().st_size}
        if llamacpp.available():
            report["verification"] = verify_gguf(model, tokenizer, written, quant, generate_tokens=generate_tokens,
                                                 ppl_tokens=ppl_tokens)
        written.replace(out_file)  # whole, or not at all
    report["verified"] = report["verification"]["passed"] if "verification" in report else None
    report["file"] = str(out_file)
    return report


@torch.inference_mode()
def verify_gguf(model: PreTrainedModel, tokenizer, path: Path, quant: str, *, generate_tokens: int,
                ppl_tokens: int) -> dict:
    """llama.cpp against torch on the same token ids: 32 greedy tokens after a random prompt, and the
    perplexity of wiki-summaries windows of 256 tokens."""
    from tyrsearch.exporters.onnx_export import compare_tokens, torch_greedy

    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    want = torch_greedy(model, prompt, generate_tokens)
    ids = data.eval_batches(tokenizer, texts.read_text("wiki-summaries"), seq_len=256, max_tokens=ppl_tokens)
    runner = llamacpp.Runner(path, context=max(256, prompt.shape[1] + generate_tokens))
    got = runner.greedy(prompt[0].tolist(), generate_tokens)
    torch_ppl = metrics.perplexity(model, ids, progress=False)["ppl"]
    llama_ppl = runner.perplexity(ids.numpy())
    figures = {"generation": {"tokens": generate_tokens, **compare_tokens(want, got, "torch")},
               "held_out": {"text": "wiki-summaries", "tokens": int(ids.numel()), "ppl_torch": torch_ppl,
                            "ppl_llama_cpp": llama_ppl, "ppl_ratio": llama_ppl / torch_ppl}}
    passed = np.isfinite(llama_ppl)
    if quant in EXACT:
        passed = passed and want == got
    if quant == "f32":
        passed = passed and abs(llama_ppl / torch_ppl - 1) <= PPL_TOLERANCE
    return {**figures, "passed": bool(passed)}

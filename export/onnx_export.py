"""Export a (pruned or dense) decoder folder to ONNX and verify the export in ONNX Runtime.

    folder/                     what `tyrsearch export --out folder/model.onnx` writes (self-contained)
      model.onnx (+ .data)      prefill graph, or with kv_cache the decoder graph (see graphs.py)
      model.int8.onnx           with int8: int8 weights (onnxruntime.quantization; see quantize_int8)
      config.json, generation_config.json, tokenizer files, genai_config.json
      runtime.py                the torch-free runner (copied from runtime.py)
      export.json               what was written and the verification figures

The export is traced by torch.onnx's dynamo exporter at batch 2 (at batch 1 it would fix the batch axis)
with every batch, sequence and past axis dynamic. Verification: onnx.checker, then ONNX Runtime against
torch on inputs of other batch and sequence lengths (max abs logit difference, argmax agreement), and
with kv_cache a greedy generation in ONNX Runtime that must equal torch's `generate`, and the same in
onnxruntime-genai (the runtime genai_config.json is for; genai.py): fp32 equal to torch, int8 equal to
ONNX Runtime on the same int8 graph.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tyrsearch import data, texts
from tyrsearch.errors import ParameterError
from tyrsearch.exporters import genai, runtime
from tyrsearch.exporters.graphs import (
    DecoderGraph,
    PrefillGraph,
    empty_past,
    head_dim,
    kv_heads,
    past_names,
    present_names,
)
from tyrsearch.exporters.smoothing import smooth_down_projections

MIN_OPSET, MAX_OPSET = 18, 23  # what the dynamo exporter writes and ONNX Runtime runs here
SHAPES = ((1, 7), (3, 33))  # (batch, seq) of the parity inputs: unlike the traced (2, 16)
# fp32 must match torch; dynamic int8 (activations quantized per tensor) is lossy by design, so its logit
# figures are reported and it fails only when broken: non-finite logits, or held-out perplexity over 3x fp32's
TOLERANCE = {"fp32": {"max_abs": 1e-2, "argmax": 0.99}, "int8": {"max_abs": float("inf"), "argmax": 0.0}}
INT8_MAX_PPL_RATIO = 3.0
INT8_METHODS = ("dynamic", "weights")


@dataclass(frozen=True)
class ExportConfig:
    kv_cache: bool = False  # the decoder graph (past key/values in, present out) instead of the prefill graph
    int8: bool = False  # also write model.int8.onnx and verify it
    int8_method: str = "dynamic"  # see quantize_int8
    int8_smooth: float = 0.75  # dynamic: SmoothQuant strength for the MLP down projections (0: none), smoothing.py
    smooth_sequences: int = 16  # c4 sequences of 512 tokens whose activation peaks set the smoothing
    opset: int = 18
    last_only: bool = False  # prefill graph: logits of the last position only
    generate_tokens: int = 32  # greedy tokens compared with torch (kv_cache)
    ppl_tokens: int = 2048  # held-out wiki-summaries tokens on which int8's perplexity change is measured


def load_for_export(folder: Path) -> tuple[PreTrainedModel, object]:
    """The model in fp32 with eager attention (plain matmuls export and run everywhere) and its tokenizer.

    MoE experts run as batched_mm (each token gathers its top-k experts' weights: Gather + MatMul): the
    default grouped_mm is a custom op with no ONNX function, and the eager loop over the experts that
    tokens hit is data-dependent, which torch.export refuses. Dense models have no experts to set.
    """
    if not (folder / "config.json").is_file():
        raise ParameterError("model", f"{folder} is not a model folder (no config.json); give a folder saved by "
                                      "`tyrsearch prune` / `search` or an HF model folder")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="batched_mm")
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def export(model_dir: Path, out_file: Path, config: ExportConfig) -> dict:
    """Export, write the folder around `out_file`, verify; returns the figures (also in export.json)."""
    if config.int8_method not in INT8_METHODS:
        raise ParameterError("int8_method", f"{config.int8_method!r} is unknown: choose {' or '.join(INT8_METHODS)}")
    if not 0 <= config.int8_smooth <= 1:
        raise ParameterError("int8_smooth", f"{config.int8_smooth} must be between 0 (no smoothing) and 1")
    if not MIN_OPSET <= config.opset <= MAX_OPSET:
        raise ParameterError("opset", f"{config.opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET}")
    if out_file.suffix != ".onnx":
        raise ParameterError("out", f"{out_file} must name a .onnx file (its folder receives the tokenizer and config)")
    folder = out_file.parent
    if out_file.exists():
        raise ParameterError("out", f"{out_file} already exists: choose a new path or remove it")
    model, tokenizer = load_for_export(Path(model_dir))
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp_name:
        tmp = Path(tmp_name)
        tic = time.perf_counter()
        files = write_graph(model, tmp / out_file.name, config)
        export_s = time.perf_counter() - tic
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(model, out_file.name), indent=2) + "\n")
        shutil.copy(runtime.__file__, tmp / "runtime.py")
        report = {"model": str(model_dir), "config": asdict(config), "export_s": export_s,
                  "verification": verify(model, tmp / out_file.name, config, precision="fp32")}
        if config.int8:
            int8_file = tmp / f"{out_file.stem}.int8.onnx"
            smoothing = write_int8(model, tokenizer, tmp / out_file.name, int8_file, config)
            files.append(int8_file.name)
            report["int8_verification"] = {**verify(model, int8_file, config, precision="int8"),
                                           "smoothing": smoothing}
            held_out = held_out_change(tmp / out_file.name, int8_file, tokenizer, tokens=config.ppl_tokens)
            report["int8_verification"]["held_out"] = held_out
            report["int8_verification"]["passed"] &= bool(held_out["ppl_ratio"] <= INT8_MAX_PPL_RATIO)
        report["files"] = {name: (tmp / name).stat().st_size for name in sorted(p.name for p in tmp.iterdir())}
        report["verified"] = all(v["passed"] for k, v in report.items() if k.endswith("verification"))
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        for path in tmp.iterdir():  # the whole set appears at once, or nothing does
            path.replace(folder / path.name)
    report["folder"] = str(folder)
    return report


def quantize_int8(source: Path, target: Path, *, method: str) -> None:
    """dynamic: MatMuls on int8 weights (one scale per output channel) and per-tensor int8 activations,
    after ONNX Runtime's pre-processing (shape inference, graph optimisation), as its quantization guide
    advises (on SmolLM2 the int8 prefill got 1.3x faster with it); weights: MatMulNBits with 8-bit
    weights in blocks of 32 (near lossless, barely faster than fp32)."""
    if method == "dynamic":
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".quantize-") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(source, prepared, save_as_external_data=True, all_tensors_to_one_file=True,
                              external_data_location=f"{prepared.name}.data")
            quantize_dynamic(prepared, target, weight_type=QuantType.QInt8, per_channel=True)
        return
    # imported here: on import this module sets the root logger to INFO, and every later quantization
    # would print hundreds of notes
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=8, block_size=32, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


def write_int8(model: PreTrainedModel, tokenizer, fp32_file: Path, int8_file: Path, config: ExportConfig) -> dict:
    """Write `int8_file`. Dynamic int8 with smoothing quantizes the graph of a smoothed copy of the model
    (the same function; see smoothing.py), otherwise the fp32 graph. Returns what was smoothed."""
    if config.int8_method != "dynamic" or config.int8_smooth == 0:
        quantize_int8(fp32_file, int8_file, method=config.int8_method)
        return {"alpha": 0.0, "mlps": 0}
    smoothed = copy.deepcopy(model)
    calibration = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=512,
                                           count=config.smooth_sequences, seed=0)
    mlps = smooth_down_projections(smoothed, calibration, alpha=config.int8_smooth)
    with tempfile.TemporaryDirectory(dir=int8_file.parent, prefix=".smoothed-") as tmp:
        source = Path(tmp) / fp32_file.name
        write_graph(smoothed, source, config)
        quantize_int8(source, int8_file, method="dynamic")
    return {"alpha": config.int8_smooth, "mlps": mlps, "calibration": {"text": "c4", "sequences": len(calibration),
                                                                       "seq_len": calibration.shape[1]}}


def write_graph(model: PreTrainedModel, path: Path, config: ExportConfig) -> list[str]:
    """Trace the prefill or decoder graph at batch 2 and save it (weights in `path.data`); returns file names."""
    batch, seq, past = 2, 16, 5  # example sizes: none 0 or 1, which torch.export would specialise
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    dynamic = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence")}
    if config.kv_cache:
        graph = DecoderGraph(model)
        layers = model.config.num_hidden_layers
        past_len = torch.export.Dim("past_sequence")
        args = (ids, torch.ones(batch, past + seq, dtype=torch.long),
                torch.arange(past, past + seq).expand(batch, seq), *empty_past(model, batch=batch, past=past))
        names = ["input_ids", "attention_mask", "position_ids", *past_names(layers)]
        shapes = ({0: dynamic["batch"], 1: dynamic["sequence"]},
                  {0: dynamic["batch"], 1: torch.export.Dim.AUTO},  # past + sequence: export derives it
                  {0: dynamic["batch"], 1: dynamic["sequence"]},
                  tuple({0: dynamic["batch"], 2: past_len} for _ in range(2 * layers)))  # *past: one nested entry
        outputs = ["logits", *present_names(layers)]
    else:
        graph = PrefillGraph(model, last_only=config.last_only)
        args = (ids, torch.ones(batch, seq, dtype=torch.long))
        names, outputs = ["input_ids", "attention_mask"], ["logits"]
        shapes = ({0: dynamic["batch"], 1: dynamic["sequence"]},) * 2
    graph.eval()
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=shapes, input_names=names,
                                    output_names=outputs, opset_version=config.opset, optimize=True,
                                    verbose=False)
    program.save(path, external_data=True)
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def genai_config(model: PreTrainedModel, filename: str) -> dict:
    """onnxruntime-genai's description of the decoder (per-layer KV heads come from the graph's inputs)."""
    config = model.config
    heads = kv_heads(model)
    return {"model": {
        "type": config.model_type.removeprefix("tyr_"),  # gemma3_text: genai's "gemma3" is the vision model
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        "vocab_size": config.vocab_size, "context_length": config.max_position_embeddings,
        "decoder": {"filename": filename, "head_size": head_dim(model), "hidden_size": config.hidden_size,
                    "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
                    "num_key_value_heads": max(heads),
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "max_length": config.max_position_embeddings}}


def held_out_change(fp32: Path, int8: Path, tokenizer, *, tokens: int, seq_len: int = 256) -> dict:
    """Perplexity of the fp32 and int8 graphs in ONNX Runtime on the same held-out wiki-summaries tokens."""
    ids = data.eval_batches(tokenizer, texts.read_text("wiki-summaries"), seq_len=seq_len, max_tokens=tokens)
    figures = {name: ort_perplexity(path, ids.numpy()) for name, path in (("fp32", fp32), ("int8", int8))}
    return {"text": "wiki-summaries", "tokens": int(ids.numel()), "ppl_fp32": figures["fp32"],
            "ppl_int8": figures["int8"], "ppl_ratio": figures["int8"] / figures["fp32"]}


def ort_perplexity(path: Path, ids: np.ndarray) -> float:
    """exp(mean next-token NLL) of the graph's logits over rows of `ids` [n, seq]."""
    decoder = runtime.Decoder.load(path)
    nll, count = 0.0, 0
    for row in ids:
        logits = decoder.logits(row[None])[0, :-1].astype(np.float64)  # [seq - 1, vocab]
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll -= log_probs[np.arange(len(row) - 1), row[1:]].sum()
        count += len(row) - 1
    return float(np.exp(nll / count))


def torch_greedy(model: PreTrainedModel, prompt: torch.Tensor, tokens: int) -> list[int]:
    """torch's `generate`: `tokens` greedy tokens after `prompt` [1, L], never stopping at end of sequence."""
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=tokens,
                          min_new_tokens=tokens, pad_token_id=model.config.eos_token_id)[0, prompt.shape[1]:].tolist()


def compare_tokens(want: list[int], got: list[int], name: str) -> dict:
    """Whether two greedy generations are equal, and where they first differ."""
    first = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
    return {f"equal_to_{name}": want == got, "first_difference": first}


@torch.inference_mode()
def verify(model: PreTrainedModel, path: Path, config: ExportConfig, *, precision: str) -> dict:
    """onnx.checker, then ONNX Runtime against torch on SHAPES; with kv_cache also greedy generation."""
    onnx.checker.check_model(str(path))  # by path: the weights live in external data
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    figures, worst, agree, total = [], 0.0, 0, 0
    for batch, seq in SHAPES:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        expected = model(input_ids=ids, attention_mask=mask).logits
        if config.last_only and not config.kv_cache:
            expected = expected[:, -1:]
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if config.kv_cache:
            feeds["position_ids"] = np.broadcast_to(np.arange(seq), (batch, seq)).copy()
            feeds.update(zip(past_names(model.config.num_hidden_layers),
                             (t.numpy() for t in empty_past(model, batch=batch)), strict=True))
        got = session.run(["logits"], feeds)[0]
        diff = float(np.abs(got - expected.numpy()).max())
        same = int((got.argmax(-1) == expected.argmax(-1).numpy()).sum())
        figures.append({"batch": batch, "seq": seq, "max_abs_diff": diff, "argmax_agreement": same / got[..., 0].size})
        worst, agree, total = max(worst, diff), agree + same, total + got[..., 0].size
    result = {"precision": precision, "checker": "passed", "inputs": figures, "max_abs_diff": worst,
              "argmax_agreement": agree / total}
    tolerance = TOLERANCE[precision]
    passed = worst <= tolerance["max_abs"] and agree / total >= tolerance["argmax"] and np.isfinite(worst)
    if config.kv_cache:
        prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=generator)
        want = torch_greedy(model, prompt, config.generate_tokens)
        got_tokens = runtime.Decoder(session).greedy(prompt.numpy(), config.generate_tokens)
        result["generation"] = {"tokens": config.generate_tokens, **compare_tokens(want, got_tokens, "torch")}
        if precision == "fp32":
            passed = passed and want == got_tokens
        if genai.available():  # the runtime genai_config.json is for: fp32 as torch, int8 as ONNX Runtime
            genai_tokens = genai.greedy(path, prompt[0].tolist(), config.generate_tokens)
            expected, name = (want, "torch") if precision == "fp32" else (got_tokens, "onnxruntime")
            result["genai"] = {"tokens": config.generate_tokens, **compare_tokens(expected, genai_tokens, name)}
            passed = passed and expected == genai_tokens
    result["tolerance"] = tolerance
    result["passed"] = bool(passed)
    return result

"""tyrsearch's Python API: what the CLI, the benchmarks and notebooks call. `search`, `prune`, `evaluate` and
`export` are here; the Mixture-of-Experts functions `stun`, `moefy` and `distill` are in `tyrsearch.moe.api`,
re-exported here.

Each function takes a model as the CLI's --model does (an alias such as `smollm2-135m`, an HF folder, a
.gguf file) or an already loaded `PreTrainedModel` with its `tokenizer`, checks every parameter before the
long work (a `ParameterError` naming the parameter), and returns a result whose `to_json()` is what the CLI
prints and writes to result.json.

    import tyrsearch
    found = tyrsearch.search("smollm2-135m", target=0.3, out="runs/s03")
    tyrsearch.evaluate(found.out / "model", text="code").ppl
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tyrsearch.atomic import write_json
from tyrsearch.errors import ParameterError, mention
from tyrsearch.results import Evaluation, ExportResult, PruneResult, SearchResult
from tyrsearch.texts import DEFAULT_CALIB, HELD_OUT_DOMAINS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tyrsearch.healing import Heal

    ModelRef = str | Path | PreTrainedModel

ALLOCATIONS = ("uniform", "owl", "knapsack")


@dataclass(frozen=True)
class Loaded:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    ref: str  # what result.json calls the model


def reference(model: ModelRef) -> str:
    """What result.json calls a model: the reference as given, or a loaded model's name_or_path (or type)."""
    return str(model) if isinstance(model, str | Path) else model.config.name_or_path or model.config.model_type


def load(model: ModelRef, tokenizer: PreTrainedTokenizerBase | None = None, *, device: str = "auto",
         dtype: str = "auto") -> Loaded:
    """A model reference loaded (in eval mode) on `device` in `dtype`, or a loaded model passed through with
    its tokenizer: it stays where it is unless `device` or `dtype` says otherwise."""
    from tyrsearch import assets
    from tyrsearch.placement import placement

    where = placement(device, dtype)
    if isinstance(model, str | Path):
        loaded, loaded_tokenizer = assets.load_model(str(model), dtype=where.dtype, device=where.device)
        return Loaded(loaded, tokenizer or loaded_tokenizer, reference(model))
    if tokenizer is None:
        raise ParameterError("tokenizer", "is needed with a loaded model: pass its tokenizer too")
    moved = {}
    if device != "auto":
        moved["device"] = where.device
    if dtype != "auto":
        moved["dtype"] = where.dtype
    return Loaded(model.to(**moved).eval(), tokenizer, reference(model))


def evaluate(model: ModelRef, *, tokenizer: PreTrainedTokenizerBase | None = None, text: str = "wiki-summaries",
             seq_len: int = 512, max_tokens: int = 65536, zero_shot: int = 0, batch_size: int = 4,
             device: str = "auto", dtype: str = "auto", progress: bool = True) -> Evaluation:
    """Perplexity on `max_tokens` of `text` (whole windows of `seq_len`) and, with `zero_shot=N`, acc and
    acc_norm on N examples each of ARC-Easy, PIQA, HellaSwag and WinoGrande. `device` and `dtype` as in
    `tyrsearch.placement` (auto: a GPU in bfloat16 where there is one, else the CPU in float32)."""
    from tyrsearch import data, metrics, texts
    from tyrsearch.placement import placement, placement_of

    placement(device, dtype)
    _check_at_least(seq_len=(seq_len, 2), max_tokens=(max_tokens, 2), batch_size=(batch_size, 1),
                    zero_shot=(zero_shot, 0))
    source = texts.read_text(text)
    loaded = load(model, tokenizer, device=device, dtype=dtype)
    batches = data.eval_batches(loaded.tokenizer, source, seq_len=seq_len, max_tokens=max_tokens)
    tic = time.perf_counter()
    ppl = metrics.perplexity(loaded.model, batches, batch_size=batch_size, progress=progress)
    elapsed = time.perf_counter() - tic
    scores = metrics.zero_shot(loaded.model, loaded.tokenizer, limit=zero_shot, progress=progress) if zero_shot \
        else None
    return Evaluation(model=loaded.ref, text=text, seq_len=seq_len, ppl=ppl["ppl"], tokens=ppl["tokens"],
                      params=metrics.total_params(loaded.model), decoder_params=metrics.decoder_params(loaded.model),
                      time_s=elapsed, zero_shot=scores, placement=placement_of(loaded.model).to_json())


def prune(model: ModelRef, *, sparsity: float, out: str | Path | None = None,
          tokenizer: PreTrainedTokenizerBase | None = None, criterion: str = "osscar", allocation: str = "uniform",
          attention_sparsity: float = 0.0, space: str | Path | None = None, sensitivity_seqs: int = 2,
          calib: str = DEFAULT_CALIB, calib_seqs: int = 64, seq_len: int = 512, sequential: bool = True,
          seed: int = 0, overwrite: bool = False, device: str = "auto", dtype: str = "auto",
          stream: bool | None = None, offload: bool = False, eval_text: str = ",".join(HELD_OUT_DOMAINS),
          eval_tokens: int = 0, heal_steps: int = 0, heal_text: str = "c4,wiki", heal_lr: float = 1e-4,
          heal_train: str = "mlp", heal_method: str = "full", progress: bool = True) -> PruneResult:
    """Prune one-shot to `sparsity` of the decoder layers' prunable parameters: a local `criterion` chooses
    the units, `allocation` (uniform, owl, knapsack) how many per layer. Saved to `out` when given (an HF
    folder with result.json; a loaded `model` is pruned in place). With `eval_tokens`, its perplexity on
    each of `eval_text` (windows of `seq_len`).

    `heal_steps` distils the pruned model from the dense one afterwards (`tyrsearch.distill` on `heal_text`,
    `heal_train` mlp or all, `heal_method` full or lora): `out` is then the healed model and `out`-oneshot
    the one before; figures["heal"] has the loss curve and the perplexities before and after.

    `stream` walks the model one layer at a time on `device` with its weights on the host (None: when they
    do not fit on the GPU; see `tyrsearch.streaming`); `offload` keeps the calibration hidden states on the
    host too."""
    from tyrsearch import data, metrics, texts
    from tyrsearch.healing import Heal
    from tyrsearch.local import make_criterion
    from tyrsearch.materialize import save_pruned
    from tyrsearch.models import adapter_for
    from tyrsearch.placement import DTYPE_NAMES, placement, placement_of
    from tyrsearch.pruner import OneShotConfig, one_shot
    from tyrsearch.search.knapsack import knapsack_prune
    from tyrsearch.space import load_space
    from tyrsearch.streaming import Stream, fits, weight_bytes

    # everything a user can get wrong is checked before the model is loaded
    where = placement(device, dtype)
    heal = Heal(steps=heal_steps, text=heal_text, lr=heal_lr, train=heal_train, method=heal_method)
    _check_prune(sparsity=sparsity, attention_sparsity=attention_sparsity, criterion=criterion,
                 allocation=allocation, stream=stream, out=None if out is None else Path(out), overwrite=overwrite,
                 heal=heal)
    _check_at_least(calib_seqs=(calib_seqs, 1), seq_len=(seq_len, 2), sensitivity_seqs=(sensitivity_seqs, 1),
                    eval_tokens=(eval_tokens, 0))
    chosen_space = load_space(str(space)) if space else None
    sources = [texts.read_text(name) for name in texts.mixture(calib)]
    held_out = {name: texts.read_text(name) for name in texts.mixture(eval_text)} if eval_tokens else {}

    # a reference for a GPU is loaded on the host first (a checkpoint in its own dtype is memory-mapped:
    # nothing is read yet), then moved whole to the GPU where it fits, else streamed there layer by layer
    on_host = isinstance(model, str | Path) and where.device.type != "cpu"
    loaded = load(model, tokenizer, device="cpu" if on_host else device, dtype=DTYPE_NAMES[where.dtype] if on_host
                  else dtype)
    if stream is None:
        stream = on_host and allocation != "knapsack" and not fits(weight_bytes(loaded.model), where.device)
    # the teacher of the heal: a reference is loaded again, a loaded model (pruned in place) copied first
    teacher = None if not heal.steps else model if isinstance(model, str | Path) else copy.deepcopy(loaded.model)
    if on_host and not stream:
        loaded.model.to(where.device)
    tokens = [data.tokenize(loaded.tokenizer, text) for text in sources]  # once, for calibration and sensitivity
    batches = data.mixed_batches(loaded.tokenizer, tokens, seq_len=seq_len, count=calib_seqs, seed=seed)
    before = {"params": metrics.total_params(loaded.model), "decoder_params": metrics.decoder_params(loaded.model)}
    if allocation == "knapsack":
        sensitivity = data.mixed_batches(loaded.tokenizer, tokens, seq_len=seq_len, count=sensitivity_seqs,
                                         seed=seed + 1)
        report = knapsack_prune(loaded.model, make_criterion(criterion, seed=seed), batches, sparsity=sparsity,
                                space=chosen_space or load_space(adapter_for(loaded.model).search_space),
                                sensitivity_batches=sensitivity)
    else:
        config = OneShotConfig(criterion=criterion, sparsity=sparsity, allocation=allocation,
                               attention_sparsity=attention_sparsity, sequential=sequential, seed=seed)
        report = one_shot(loaded.model, config, batches, progress=progress,
                          stream=Stream(device=where.device if stream else None, offload=offload))
    figures = {
        "model": loaded.ref, "out": None if out is None else str(out),
        "params_before": before["params"], "params_after": metrics.total_params(loaded.model),
        "decoder_params_before": before["decoder_params"], "decoder_params_after": metrics.decoder_params(loaded.model),
        "calibration": {"source": calib, "sequences": calib_seqs, "seq_len": seq_len,
                        "tokens": int(batches.numel()), "seed": seed},
        "placement": {**placement_of(loaded.model).to_json(), **({"streamed_to": str(where.device)} if stream else {}),
                      **({"offload": True} if offload else {})},
        **report,
    }
    if held_out:
        figures["held_out"] = metrics.held_out(loaded.model, loaded.tokenizer, held_out, seq_len=seq_len,
                                               max_tokens=eval_tokens, progress=progress)
    if out is None:
        return PruneResult(figures=figures, out=None, model=loaded.model, tokenizer=loaded.tokenizer)
    if not heal.steps:
        save_pruned(loaded.model, loaded.tokenizer, out, result=figures)
        return PruneResult(figures=figures, out=Path(out), model=loaded.model, tokenizer=loaded.tokenizer)
    return _heal_pruned(loaded, teacher, Path(out), figures, heal, held_out=held_out, seq_len=seq_len,
                        eval_tokens=eval_tokens, overwrite=overwrite, device=device, dtype=dtype, progress=progress)


def _heal_pruned(loaded: Loaded, teacher: ModelRef, out: Path, figures: dict, heal: Heal, *, held_out: dict[str, str],
                 seq_len: int, eval_tokens: int, overwrite: bool, device: str, dtype: str,
                 progress: bool) -> PruneResult:
    """`prune`'s model saved to `out`-oneshot, healed from `teacher` into `out`; result.json gains "heal"."""
    from tyrsearch.materialize import save_pruned

    save_pruned(loaded.model, loaded.tokenizer, oneshot_dir(out), result=figures)
    tokenizer = loaded.tokenizer
    del loaded  # the pruned model is read back from its folder as the heal's student
    healed = heal_saved(teacher, oneshot_dir(out), out, heal, tokenizer=tokenizer, held_out=held_out,
                        seq_len=seq_len, eval_tokens=eval_tokens, overwrite=overwrite, device=device, dtype=dtype,
                        progress=progress)
    figures = {**figures, "heal": healed.figures}
    write_json(out / "result.json", figures)
    return PruneResult(figures=figures, out=out, model=healed.model, tokenizer=tokenizer)


def _check_prune(*, sparsity: float, attention_sparsity: float, criterion: str, allocation: str,
                 stream: bool | None, out: Path | None, overwrite: bool, heal: Heal) -> None:
    """`prune`'s parameter checks that need no model (the ParameterError names the parameter)."""
    from tyrsearch import allocation as allocations
    from tyrsearch import texts
    from tyrsearch.local import make_criterion

    if heal.steps and out is None:
        raise ParameterError("heal_steps", f"needs {mention('out')}: healing keeps its checkpoints beside it")
    allocations.check_sparsity(sparsity)
    allocations.check_sparsity(attention_sparsity, parameter="attention_sparsity")
    make_criterion(criterion)
    if allocation not in ALLOCATIONS:
        raise ParameterError("allocation", f"{allocation!r} is unknown: choose one of {', '.join(ALLOCATIONS)}")
    if stream and allocation == "knapsack":
        raise ParameterError("stream", "is for uniform and owl allocations: knapsack builds a supernet in memory")
    if out is not None:
        check_out_dir(out, overwrite=overwrite)
    if heal.steps:
        check_out_dir(oneshot_dir(out), overwrite=overwrite)
        for name in texts.mixture(heal.text):
            texts.read_text(name)


def oneshot_dir(out: Path) -> Path:
    """Where `prune` with healing saves the model before the heal: beside `out`."""
    return out.with_name(out.name + "-oneshot")


def heal_saved(teacher: ModelRef, oneshot: Path, out: Path, heal: Heal, *, tokenizer: PreTrainedTokenizerBase,
               held_out: dict[str, str], seq_len: int, eval_tokens: int, overwrite: bool = False,
               device: str = "auto", dtype: str = "auto", progress: bool = True):
    """The pruned model saved in `oneshot` distilled from `teacher` (a `tyrsearch.healing.Heal`) into `out`:
    a DistillResult whose figures are what result.json says of the heal (the loss curve, the epochs over the
    text and, on `held_out` texts, the perplexities after it). Warmup: a tenth of the steps, at most 20."""
    from tyrsearch import metrics
    from tyrsearch.healing import HEAL_BATCH, HEAL_SEQ_LEN

    healed = distill(teacher, oneshot, out=out, tokenizer=tokenizer, steps=heal.steps, batch_size=HEAL_BATCH,
                     seq_len=HEAL_SEQ_LEN, lr=heal.lr, warmup=min(20, heal.steps // 10), train=heal.train,
                     method=heal.method, text=heal.text, eval_tokens=0, overwrite=overwrite, device=device,
                     dtype=dtype, progress=progress)
    figures = {key: value for key, value in healed.figures.items() if key not in ("teacher", "student", "out")}
    if held_out:
        figures["held_out"] = metrics.held_out(healed.model, tokenizer, held_out, seq_len=seq_len,
                                               max_tokens=eval_tokens, progress=progress)
    return replace(healed, figures=figures)


def search(model: ModelRef, *, target: float, out: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
           space: str | Path | None = None, budget: str = "params", objectives: str | tuple[str, ...] = ("kl",),
           calib: str = DEFAULT_CALIB, calib_seqs: int = 32, seq_len: int = 512, criterion: str = "osscar",
           strategy: str | None = None, start: str = "knapsack", sensitivity_seqs: int = 2,
           latency_seq_len: int = 128, storage: str | None = None, study_name: str | None = None,
           runner: str = "local", workers: int | None = None, worker_threads: int | None = None,
           address: str | None = None,
           heartbeat: int = 10, seed: int = 0, resume: bool = False, supernet_dir: str | Path | None = None,
           no_rebuild: bool = False, eval_tokens: int = 0, eval_text: str = ",".join(HELD_OUT_DOMAINS),
           device: str = "auto", dtype: str = "auto", heal_steps: int = 0, heal_text: str = "c4,wiki",
           heal_lr: float = 1e-4, heal_train: str = "mlp", heal_method: str = "full", heal_candidates: int = 0,
           heal_select_steps: int = 50, rounds: int = 1, progress: bool = True) -> SearchResult:
    """Search how much to prune in each layer so that `target` of the dense model's `budget` (params, flops
    or latency) is removed: a coarse-to-fine evolution over a supernet, kept in an Optuna study (`storage`,
    default sqlite:///OUT/study.db; `resume=True` continues it). The winner is saved to OUT/model with
    OUT/result.json and OUT/report.html; with `eval_tokens`, its perplexity on each `eval_text` too. The
    search process runs the model on `device` in `dtype`; workers evaluate in the same dtype on their own
    device. `heal_steps` heals the winner as `prune` does: OUT/model is the healed model, OUT/model-oneshot
    the one before, and with `eval_tokens` result.json has the held-out perplexities before and after.
    `heal_candidates=K` heals the K best distinct candidates `heal_select_steps` steps each and keeps the one
    closest to the dense model on held-back tokens (`tyrsearch.search.heal_select`). `rounds=R` reaches the
    target in R searches, each healed, each starting from the last one's model (`tyrsearch.search.rounds`)."""
    from tyrsearch.healing import Heal
    from tyrsearch.search.pipeline import SearchRequest, run_search

    request = SearchRequest(
        target=target, out=Path(out), space=space, budget=budget,
        objectives=objectives if isinstance(objectives, str) else ",".join(objectives), calib=calib,
        calib_seqs=calib_seqs, seq_len=seq_len, criterion=criterion, strategy=strategy, start=start,
        sensitivity_seqs=sensitivity_seqs, latency_seq_len=latency_seq_len, storage=storage, study_name=study_name,
        runner=runner, workers=workers, worker_threads=worker_threads, address=address, heartbeat=heartbeat,
        seed=seed, resume=resume, supernet_dir=None if supernet_dir is None else Path(supernet_dir),
        no_rebuild=no_rebuild, eval_tokens=eval_tokens, eval_text=eval_text, device=device, dtype=dtype,
        heal=Heal(steps=heal_steps, text=heal_text, lr=heal_lr, train=heal_train, method=heal_method,
                  candidates=heal_candidates, select_steps=heal_select_steps))
    _check_at_least(rounds=(rounds, 1))
    if rounds > 1:
        from tyrsearch.search.rounds import run_rounds

        return run_rounds(model, request, rounds, tokenizer=tokenizer, progress=progress)
    return run_search(model, request, tokenizer=tokenizer, progress=progress)


def export(model: str | Path, *, out: str | Path, format: str = "onnx", kv_cache: bool = False, int8: bool = False,
           int8_method: str = "dynamic", int8_smooth: float = 0.75, opset: int = 18, last_only: bool = False,
           quant: str = "f16") -> ExportResult:
    """Export a saved model (a folder from `prune` or `search`, or any --model reference) and verify it in the
    runtime it is for. `format="onnx"`: `out` is a .onnx file (its folder receives the tokenizer, config,
    genai_config.json and runtime.py), verified in ONNX Runtime and, with `kv_cache`, onnxruntime-genai.
    `format="gguf"`: `out` is a .gguf file for llama.cpp (`quant` f32, f16, q8_0 or q4_k_m), verified in
    llama.cpp where llama-cpp-python is installed. `verified` is False, with the figures, when they disagree
    (None: no runtime to verify in)."""
    from tyrsearch import assets

    if format not in ("onnx", "gguf"):
        raise ParameterError("format", f"{format!r} is unknown: choose onnx or gguf")
    folder = assets.resolve_model(str(model))
    if format == "gguf":
        from tyrsearch.exporters.gguf_export import export_gguf

        onnx_only = {"kv_cache": kv_cache, "int8": int8, "last_only": last_only}
        if used := [name for name, value in onnx_only.items() if value]:
            raise ParameterError(used[0], f"is for {mention('format')} onnx; a GGUF file is quantized with "
                                          f"{mention('quant')}")
        return ExportResult(figures=export_gguf(folder, Path(out), quant=quant), out=Path(out))
    from tyrsearch.exporters.onnx_export import ExportConfig
    from tyrsearch.exporters.onnx_export import export as write_onnx

    config = ExportConfig(kv_cache=kv_cache, int8=int8, int8_method=int8_method, int8_smooth=int8_smooth,
                          opset=opset, last_only=last_only)
    return ExportResult(figures=write_onnx(folder, Path(out), config), out=Path(out))


def check_out_dir(out: Path, *, overwrite: bool, parameter: str = "out") -> None:
    """Refuse a used or unwritable output folder before any work is done."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise ParameterError(parameter, f"{out} is a file; give a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ParameterError(parameter, f"{out} already exists and is not empty; choose a new folder or pass "
                                        f"{mention('overwrite')}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as exc:
        raise ParameterError(parameter, f"{out} is not writable ({exc.strerror}); choose a folder you can write "
                                        "to") from None


def _check_at_least(**values: tuple[Any, int]) -> None:
    """Each keyword's (value, minimum): an integer at least the minimum."""
    for name, (value, minimum) in values.items():
        if not isinstance(value, int) or value < minimum:
            raise ParameterError(name, f"must be an integer >= {minimum}, got {value!r}")


# re-exported, and imported last: tyrsearch.moe.api uses the helpers above
from tyrsearch.moe.api import distill, moefy, stun  # noqa: E402, F401

"""llama.cpp through llama-cpp-python: the runtime a GGUF export is verified in (and timed by
benchmarks/edge.py), and its quantizer for the k-quants gguf-py does not write.

Token ids go in directly (no llama.cpp tokenization), so what is compared with torch is the model alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import time
from pathlib import Path

import numpy as np

K_QUANTS = {"q4_k_m": 15}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_K_M


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def quantize(source: Path, target: Path, quant: str, *, threads: int = 0) -> None:
    """llama.cpp's quantizer (llama_model_quantize) from an f16/f32 GGUF to `quant` (q4_k_m)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = K_QUANTS[quant], threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {quant}")


@contextlib.contextmanager
def _quiet():
    """llama.cpp prints its loading log on the C stderr: hide it (fd 2) while a model loads."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _without_amx():
    """Load without llama.cpp's extra weight buffer types where the build uses AMX: its AMX buffers crash
    (a general protection fault in libggml-cpu as a q8_0 SmolLM2 loads) on the AMX machines we run on.
    Llama() takes no such argument, so its default model parameters are patched while it loads; this also
    turns off the CPU repacking, the price of a model that loads."""
    import llama_cpp
    import llama_cpp.llama as high_level

    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        yield
        return
    default = high_level.llama_cpp.llama_model_default_params

    def params():
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    high_level.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = default


class Runner:
    """One GGUF file loaded in llama.cpp, evaluated from token ids on `threads` CPU threads."""

    def __init__(self, path: Path, *, context: int = 512, threads: int = 2, all_logits: bool = True,
                 flash_attention: bool = False) -> None:
        """`all_logits`: keep every position's logits (what `logits` and `perplexity` read); without it a
        batch computes the last position's only, as llama.cpp's own tools do. `flash_attention`: llama.cpp's
        fused attention (its command-line tools' CPU default, llama-cpp-python's off)."""
        import llama_cpp

        with _quiet(), _without_amx():
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                                       n_threads_batch=threads, logits_all=all_logits,
                                       flash_attn=flash_attention, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of one sequence from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def greedy(self, prompt: list[int], tokens: int) -> list[int]:
        """`tokens` greedy tokens after `prompt` (argmax of the logits, no stop at end of sequence)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(tokens):
            out.append(self._next_token())
            self.llm.eval([out[-1]])
        return out

    def _next_token(self) -> int:
        """The argmax of the last evaluated position's logits (there with or without `all_logits`)."""
        import llama_cpp

        last = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),))))

    def perplexity(self, rows: np.ndarray) -> float:
        """exp(mean next-token NLL) over rows [n, seq] of token ids, each from an empty cache."""
        nll, count = 0.0, 0
        for row in rows:
            logits = self.logits(row.tolist())[:-1]  # [seq - 1, vocab]
            top = logits.max(-1, keepdims=True)
            log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            nll -= log_probs[np.arange(len(row) - 1), row[1:]].sum()
            count += len(row) - 1
        return math.exp(nll / count)

    def speed(self, prompt: list[int], tokens: int) -> dict:
        """Prompt processing and generation tokens/s at batch 1: `prompt` in one batch, then `tokens` one
        at a time."""
        self.llm.reset()
        tic = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(tokens):
            self.llm.eval([self._next_token()])
        generate = time.perf_counter() - tic
        return {"prompt_tokens_per_s": len(prompt) / prefill, "generate_tokens_per_s": tokens / generate}

"""onnxruntime-genai, the runtime a folder's genai_config.json is written for: greedy generation of one of
the folder's graphs through `og.Model` and `og.Generator`, as a deployment would run it.

It reads each layer's KV-head count from the graph's `past_key_values.{i}` shapes, so per-layer pruned
graphs (a layer without attention carries one head of zeros, see graphs.py) need nothing extra.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def _model(graph: Path, threads: int | None):
    """The graph at `graph` (its folder holds genai_config.json) loaded as an `og.Model`."""
    import onnxruntime_genai as og

    decoder = {"filename": graph.name}  # the fp32 or the int8 graph
    if threads:
        decoder["session_options"] = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config = og.Config(str(graph.parent))
    config.overlay(json.dumps({"model": {"decoder": decoder}}))
    return og.Model(config)


def _generator(model, length: int):
    """A greedy generator for `length` tokens in all, never stopping early at an end-of-sequence token."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    return og.Generator(model, params)


def greedy(graph: Path, prompt: list[int], tokens: int, *, threads: int | None = None) -> list[int]:
    """`tokens` greedy tokens after `prompt` (as torch's `generate` with `min_new_tokens`)."""
    generator = _generator(_model(graph, threads), len(prompt) + tokens)
    generator.append_tokens(prompt)
    out = []
    while len(out) < tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


class Runner:
    """One graph loaded once, timed as often as asked (a fresh generator each time)."""

    def __init__(self, graph: Path, *, threads: int | None = None) -> None:
        self.model = _model(graph, threads)

    def speed(self, prompt: list[int], tokens: int) -> dict:
        """Prompt processing and generation tokens/s at batch 1 (the prompt in one step, then one token a
        step)."""
        generator = _generator(self.model, len(prompt) + tokens + 1)
        tic = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()  # the prompt's forward happens with the first token
        prefill = time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(tokens):
            generator.generate_next_token()
        return {"prompt_tokens_per_s": len(prompt) / prefill,
                "generate_tokens_per_s": tokens / (time.perf_counter() - tic)}

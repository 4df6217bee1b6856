"""What the API returns. Each result's `to_json()` is exactly what the CLI prints with --json and writes to
result.json; the loaded models ride along for the caller but are not part of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Evaluation:
    """Perplexity of a model on a text (and zero-shot accuracy, when asked for)."""

    model: str
    text: str
    seq_len: int
    ppl: float
    tokens: int
    params: int
    decoder_params: int
    time_s: float
    zero_shot: dict | None = None  # task -> {acc, acc_norm, n}
    placement: dict | None = None  # {device, dtype} the model ran on

    def to_json(self) -> dict:
        out = {"ppl": self.ppl, "tokens": self.tokens, "params": self.params, "decoder_params": self.decoder_params,
               "model": self.model, "text": self.text, "seq_len": self.seq_len, "time_s": round(self.time_s, 3),
               "tokens_per_s": round(self.tokens / self.time_s, 1)}
        out |= {"placement": self.placement} if self.placement is not None else {}
        return out | ({"zero_shot": self.zero_shot} if self.zero_shot is not None else {})


@dataclass(frozen=True)
class ModelResult:
    """A model made by the API and its figures (result.json)."""

    figures: dict
    out: Path | None  # the saved HF folder (search: the run folder, the model in out/model)
    model: Any = field(repr=False, compare=False)  # the PreTrainedModel made (pruned, moefied or trained)
    tokenizer: Any = field(repr=False, compare=False)

    def to_json(self) -> dict:
        return self.figures


class PruneResult(ModelResult):
    """A pruned model: one-shot (`prune`, `out` None when it was not saved) or STUN's experts and zeros (`stun`)."""

    @property
    def achieved_sparsity(self) -> float:
        return self.figures["achieved_sparsity"]

    @property
    def layers(self) -> list[dict]:
        """Each layer's kept shape (num_attention_heads, num_key_value_heads, intermediate_size; `prune` and
        `search`; `stun` reports its per-layer expert counts in figures["experts"] instead)."""
        return self.figures["layers"]


class SearchResult(PruneResult):
    """A search's winner, saved in out/model (its figures are kept in the study too, for `tyrsearch report`)."""


class MoefyResult(ModelResult):
    """A dense model split into a Mixtral MoE (`moefy`), saved in `out`; `model` is the MoE."""

    @property
    def ppl_ratio(self) -> float | None:
        """The MoE's held-out perplexity over the dense model's (None when not measured)."""
        return self.figures.get("ppl_ratio")


class DistillResult(ModelResult):
    """A student trained towards its teacher (`distill`), saved in `out`; `model` is the trained student."""

    @property
    def ppl_ratio(self) -> float | None:
        """The student's held-out perplexity over the teacher's after training (None when not measured)."""
        return self.figures.get("ppl_ratio")


@dataclass(frozen=True)
class ExportResult:
    """An export (ONNX: its export.json; GGUF) and its verification against torch in its runtime."""

    figures: dict
    out: Path

    @property
    def verified(self) -> bool | None:
        """Whether the runtime agreed with torch; None where its runtime is not installed (GGUF without
        llama-cpp-python)."""
        return self.figures["verified"]

    def to_json(self) -> dict:
        return self.figures

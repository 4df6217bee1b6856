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

    def to_json(self) -> dict:
        out = {"ppl": self.ppl, "tokens": self.tokens, "params": self.params, "decoder_params": self.decoder_params,
               "model": self.model, "text": self.text, "seq_len": self.seq_len, "time_s": round(self.time_s, 3),
               "tokens_per_s": round(self.tokens / self.time_s, 1)}
        return out | ({"zero_shot": self.zero_shot} if self.zero_shot is not None else {})


@dataclass(frozen=True)
class ModelResult:
    """A pruned model and its figures (result.json)."""

    figures: dict
    out: Path | None  # the saved HF folder (search: the run folder, the model in out/model)
    model: Any = field(repr=False, compare=False)  # the pruned PreTrainedModel
    tokenizer: Any = field(repr=False, compare=False)

    @property
    def achieved_sparsity(self) -> float:
        return self.figures["achieved_sparsity"]

    @property
    def layers(self) -> list[dict]:
        """Each layer's kept shape (num_attention_heads, num_key_value_heads, intermediate_size)."""
        return self.figures["layers"]

    def to_json(self) -> dict:
        return self.figures


class PruneResult(ModelResult):
    """A one-shot pruned model (`out` None when it was not saved)."""


class SearchResult(ModelResult):
    """A search's winner, saved in out/model (its figures are kept in the study too, for `tyrsearch report`)."""


@dataclass(frozen=True)
class ExportResult:
    """An ONNX export and its verification against torch in ONNX Runtime (export.json)."""

    figures: dict
    out: Path

    @property
    def verified(self) -> bool:
        return self.figures["verified"]

    def to_json(self) -> dict:
        return self.figures

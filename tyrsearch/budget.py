"""What a search target is a fraction of: decoder parameters, FLOPs per token, or estimated latency.

A budget prices a decoder layer at a shape (and the model's fixed part); `--target T` keeps candidates at
(1 - T) of the dense model's price. Parameters and FLOPs are linear in the units kept, so the search's
level swaps keep them exact. Latency comes from a `LatencyTable` measured on this machine (see
`tyrsearch.exporters.latency`); it is not linear in the units, so a latency budget is kept within a band
just under the limit instead of exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tyrsearch.allocation import Dims
from tyrsearch.errors import UserError
from tyrsearch.models import LayerShape

BUDGETS = ("params", "flops", "latency")
LATENCY_BAND = 0.02  # a latency candidate may use between 98% and 100% of the limit


@dataclass(frozen=True)
class LatencyTable:
    """ONNX Runtime milliseconds of one decoder block on one machine, for one workload (prefill of
    `seq_len` tokens at batch 1, logits of the last position). A model's estimate is the sum of its blocks
    and the fixed part (embeddings, final norm, lm_head)."""

    machine: str  # what the figures were measured on (host, CPU, threads, onnxruntime version)
    model: str  # the dense dimensions the blocks have (hidden, head_dim, vocab, ...)
    seq_len: int
    threads: int
    base_ms: float
    attention_ms: dict[tuple[int, int], float]  # (kv_heads, q_per_kv) -> ms; 0 heads costs nothing
    mlp_ms: dict[int, float] = field(default_factory=dict)  # intermediate channels (a grid) -> ms

    def attention(self, shape: LayerShape) -> float:
        if shape.q_heads == 0:
            return 0.0
        return self.attention_ms[(shape.kv_heads, shape.q_per_kv)]

    def mlp(self, shape: LayerShape) -> float:
        """Linear between the measured channel counts (0 channels: the block is removed, 0 ms)."""
        if shape.intermediate == 0:
            return 0.0
        grid = sorted(self.mlp_ms)
        i = min(max(bisect.bisect_left(grid, shape.intermediate), 1), len(grid) - 1)
        lo, hi = grid[i - 1], grid[i]
        share = (shape.intermediate - lo) / (hi - lo)
        return self.mlp_ms[lo] + share * (self.mlp_ms[hi] - self.mlp_ms[lo])

    def estimate(self, shapes: list[LayerShape]) -> float:
        return self.base_ms + sum(self.attention(s) + self.mlp(s) for s in shapes)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "model": self.model, "seq_len": self.seq_len, "threads": self.threads,
                "base_ms": self.base_ms,
                "attention_ms": [[kv, q, ms] for (kv, q), ms in sorted(self.attention_ms.items())],
                "mlp_ms": [[channels, ms] for channels, ms in sorted(self.mlp_ms.items())]}

    @classmethod
    def from_dict(cls, raw: dict) -> LatencyTable:
        return cls(machine=raw["machine"], model=raw["model"], seq_len=raw["seq_len"], threads=raw["threads"],
                   base_ms=raw["base_ms"], attention_ms={(kv, q): ms for kv, q, ms in raw["attention_ms"]},
                   mlp_ms={channels: ms for channels, ms in raw["mlp_ms"]})


class Budget:
    """Prices decoder layers in one currency. `exact`: prices are integers that level swaps keep exactly."""

    name = ""
    exact = True
    resolution = 1.0  # the smallest price difference that matters (the knapsack's quantum)

    def layer(self, shape: LayerShape) -> float:
        raise NotImplementedError

    def fixed(self) -> float:
        """The price of what no unit removes (embeddings, lm_head)."""
        return 0.0

    def total(self, shapes: list[LayerShape]) -> float:
        return self.fixed() + sum(map(self.layer, shapes))


class ParamsBudget(Budget):
    """Decoder layers' prunable parameters (the default; the fixed part is left out, as in `--sparsity`)."""

    name = "params"

    def __init__(self, *, dims: Dims):
        self.dims = dims

    def layer(self, shape: LayerShape) -> int:
        return self.dims.params(shape)


class FlopsBudget(Budget):
    """FLOPs per token of a prefill of `seq_len` tokens: 2 per weight (lm_head included) plus attention
    scores and values over seq_len / 2 keys on average (causal)."""

    name = "flops"

    def __init__(self, *, dims: Dims, seq_len: int, vocab: int):
        self.dims, self.seq_len, self.vocab = dims, seq_len, vocab

    def layer(self, shape: LayerShape) -> int:
        return 2 * self.dims.params(shape) + 2 * self.seq_len * shape.q_heads * self.dims.head_dim

    def fixed(self) -> int:
        return 2 * self.dims.hidden * self.vocab


class LatencyBudget(Budget):
    """Estimated ONNX Runtime prefill milliseconds from a latency table."""

    name = "latency"
    exact = False
    resolution = 1e-3  # a microsecond

    def __init__(self, *, table: LatencyTable):
        self.table = table

    def layer(self, shape: LayerShape) -> float:
        return self.table.attention(shape) + self.table.mlp(shape)

    def fixed(self) -> float:
        return self.table.base_ms


def make_budget(name: str, *, dims: Dims, seq_len: int, vocab: int, table: LatencyTable | None = None) -> Budget:
    """The budget by name; `latency` needs the table."""
    if name == "params":
        return ParamsBudget(dims=dims)
    if name == "flops":
        return FlopsBudget(dims=dims, seq_len=seq_len, vocab=vocab)
    if name == "latency":
        if table is None:
            raise ValueError("the latency budget needs a latency table")
        return LatencyBudget(table=table)
    raise UserError(f"unknown budget {name!r}: choose one of {', '.join(BUDGETS)}")


def limit(budget: Budget, dense: list[LayerShape], target: float) -> float:
    """The most a candidate may cost: (1 - target) of the dense model's price."""
    return (1 - target) * budget.total(dense)

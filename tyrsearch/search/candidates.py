"""Cheap candidate evaluation: a candidate is assembled from the supernet and scored against the dense model.

Nothing whole is copied per candidate. Each (layer, unit type, level) block is cut from the dense layer once
and cached; a candidate's layer is a shallow container that points at the dense norms and at two cached
blocks. Offspring differ from their parent in a few layers only, so the hidden states entering every
layer are cached for the parent, and a candidate runs from its first differing layer. Fitness on n
sequences extends the score already known on fewer (the selection stages use nested token sets).
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from tyrsearch.calibration import LayerInputs
from tyrsearch.metrics import Reference
from tyrsearch.models import ATTENTION_UNITS, adapter_for
from tyrsearch.supernet import Supernet

Levels = list[dict[str, int]]  # per layer: unit type -> level


def levels_key(levels: Levels) -> tuple:
    return tuple(tuple(sorted(layer.items())) for layer in levels)


class CandidateEvaluator:
    """Fitness of candidates (one level per layer and unit type) on the reference's token batches.

    metric "kl": mean KL(dense || candidate) per position; "ppl": perplexity of the batches.
    """

    def __init__(self, *, model: nn.Module, supernet: Supernet, reference: Reference, metric: str = "kl",
                 batch_size: int = 4):
        self.model, self.supernet, self.reference, self.metric = model, supernet, reference, metric
        self.adapter = adapter_for(model)
        self.dense_layers = list(self.adapter.layers(model))
        self.head_dim = self.adapter.head_dim(model)
        self.batch_size = batch_size
        inputs = LayerInputs(model, self.adapter, reference.batches, batch_size=batch_size)
        self.layer_kwargs = inputs.layer_kwargs
        self._hidden = [torch.cat(inputs.hidden)]  # [i]: input of layer i for the parent, [n, L, hidden]
        self.parent: Levels = [{unit: 0 for unit in units} for units in supernet.grid]  # valid up to len(_hidden)
        self._blocks: dict[tuple[int, str, int], nn.Module] = {}
        self._layers: dict[tuple, nn.Module] = {}
        self._scores: dict[tuple, list[tuple[float, int]]] = {}
        self.seconds = 0.0  # spent in fitness()
        self.evaluated_sequences = 0

    @property
    def sequences(self) -> int:
        return self.reference.batches.shape[0]

    # -- assembly -------------------------------------------------------------------------------------

    def _block(self, idx: int, unit: str, level: int) -> nn.Module:
        """The attention or MLP block of layer `idx` cut to `level` (cut once, then cached)."""
        keep = self.supernet.keep(idx, unit, level)
        name = "self_attn" if unit in ATTENTION_UNITS else "mlp"
        dense = self.dense_layers[idx]
        if keep == self.adapter.shape(dense).units(unit):
            return dense.get_submodule(name)
        key = (idx, unit, keep)
        if key not in self._blocks:
            work = copy.deepcopy(dense)
            self.adapter.prune_layer_(work, unit, self.supernet.selection(idx, unit, level), layer_idx=idx,
                                      head_dim=self.head_dim)
            self._blocks[key] = work.get_submodule(name)
        return self._blocks[key]

    def layer(self, idx: int, levels: dict[str, int]) -> nn.Module:
        """Decoder layer `idx` at `levels`: the dense layer's norms with cached cut blocks."""
        key = (idx, tuple(sorted(levels.items())))
        if key not in self._layers:
            layer = copy.copy(self.dense_layers[idx])  # shares parameters; only the submodule table is new
            layer._modules = dict(layer._modules)
            for unit, level in levels.items():
                layer._modules["self_attn" if unit in ATTENTION_UNITS else "mlp"] = self._block(idx, unit, level)
            self._layers[key] = layer
        return self._layers[key]

    # -- evaluation -----------------------------------------------------------------------------------

    def first_difference(self, levels: Levels, other: Levels) -> int:
        return next((i for i, (a, b) in enumerate(zip(levels, other, strict=True)) if a != b), len(levels))

    @torch.inference_mode()
    def set_parent(self, levels: Levels) -> None:
        """Cache the hidden states entering every layer of `levels` (recomputed from the first change)."""
        start = self._start(levels)
        self.parent = [dict(layer) for layer in levels]
        del self._hidden[start + 1:]
        for idx in range(start, len(levels) - 1):
            self._hidden.append(self._run(self._hidden[idx], idx, idx + 1, levels))

    def _start(self, levels: Levels) -> int:
        """The first layer `levels` must run itself: the parent's cached inputs serve every layer before."""
        return min(self.first_difference(levels, self.parent), len(self._hidden) - 1)

    def _run(self, hidden: torch.Tensor, start: int, stop: int, levels: Levels) -> torch.Tensor:
        """Layers start..stop-1 of the candidate on hidden [n, L, hidden], in chunks of batch_size."""
        out = []
        for h in hidden.split(self.batch_size):
            for idx in range(start, stop):
                h = self.layer(idx, levels[idx])(h, **self.layer_kwargs[idx])
                h = h[0] if isinstance(h, tuple) else h
            out.append(h)
        return torch.cat(out)

    @torch.inference_mode()
    def fitness(self, levels: Levels, sequences: int, *, reuse: bool = True) -> float:
        """Fitness (lower is better) on the first `sequences` sequences. reuse=False ignores every
        cache (a full forward from the embeddings), the baseline cheap evaluation is measured against."""
        tic = time.perf_counter()
        if not 0 < sequences <= self.sequences:
            raise ValueError(f"sequences must be in 1..{self.sequences}, got {sequences}")
        key = levels_key(levels)
        rows = self._scores.setdefault(key, []) if reuse else []  # per sequence: (sum, positions)
        start = self._start(levels) if reuse else 0
        for first in range(len(rows), sequences, self.batch_size):
            last = min(first + self.batch_size, sequences)
            hidden = self._run(self._hidden[start][first:last], start, len(levels), levels)
            logits = self.adapter.logits(self.model, hidden)
            rows.extend(self._score(first + row, logits[row:row + 1]) for row in range(last - first))
            self.evaluated_sequences += last - first
        self.seconds += time.perf_counter() - tic
        mean = sum(s for s, _ in rows[:sequences]) / sum(n for _, n in rows[:sequences])
        return mean if self.metric == "kl" else math.exp(mean)

    def _score(self, first: int, logits: torch.Tensor) -> tuple[float, int]:
        if self.metric == "kl":
            return self.reference.kl_sum(first, logits)
        targets = self.reference.batches[first:first + logits.shape[0], 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                reduction="sum")
        return float(nll), targets.numel()

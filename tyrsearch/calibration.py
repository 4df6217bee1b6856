"""Calibration statistics, collected layer by layer.

`LayerInputs` holds the hidden states that enter one decoder layer for every calibration sequence and
moves them forward one layer at a time. Between two steps the layer can be pruned, so layer l+1 is
calibrated on what the pruned layers < l produce (sequential calibration), or on the dense outputs.
This walks the model once in total, whatever the number of layers.

A bfloat16 model is walked in bfloat16: walking it in float32 (each layer cast up while it runs) was
measured and bought nothing (SmolLM2-135M, osscar, 30%, 16 x 512 calibration tokens: 97.8% of the MLP
channels that float32 keeps either way); the statistics are summed in float64 all the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tyrsearch.models import FamilyAdapter


@dataclass
class InputStats:
    """Second-moment statistics of a linear layer's input x [tokens, D], summed over tokens."""

    xtx: torch.Tensor  # [D, D] float64: sum of x x^T
    x_sum: torch.Tensor  # [D] float64: sum of x
    tokens: int = 0

    @classmethod
    def empty(cls, dim: int, device: torch.device | None = None) -> InputStats:
        return cls(xtx=torch.zeros(dim, dim, dtype=torch.float64, device=device),
                   x_sum=torch.zeros(dim, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        # float32 products of the bfloat16 / float16 / float32 activations, summed in float64: a bf16
        # product would round each x_i x_j to 8 bits before the sum over thousands of tokens
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, D]
        self.xtx += (x.T @ x).double()
        self.x_sum += x.sum(0).double()
        self.tokens += x.shape[0]

    def select(self, cols: torch.Tensor) -> InputStats:
        """The statistics of x[:, cols] (inputs of units that survive a cut are unchanged)."""
        return InputStats(xtx=self.xtx[cols][:, cols], x_sum=self.x_sum[cols], tokens=self.tokens)


class _StopForward(Exception):
    pass


class LayerInputs:
    """Hidden states entering decoder layer `self.layer` for a fixed set of token batches.

    Each layer runs where its weights are: a walk that streams the model (weights on the host, one layer at
    a time moved to the GPU, see `tyrsearch.streaming`) moves the layer, and the hidden states follow it.
    They are kept on the device of the embeddings, or on the host with `offload` when they do not fit there.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, batches: torch.Tensor, *,
                 batch_size: int = 8, offload: bool = False):
        self.model, self.adapter = model, adapter
        self.layer = 0
        layers = adapter.layers(model)
        self.store = torch.device("cpu") if offload else model.get_input_embeddings().weight.device
        # Each layer's keyword inputs (position embeddings, masks per attention type) depend only on the
        # sequence length, and broadcast over the batch: capture them once with a single sequence, every
        # layer passing its input through (nothing is computed, so this costs no layer forward).
        self.layer_kwargs: list[dict] = [{} for _ in layers]
        self.hidden: list[torch.Tensor] = []  # each [batch, seq, hidden], on self.store

        def keep_hidden(module, args, kwargs):
            self.hidden.append((args[0] if args else kwargs["hidden_states"]).to(self.store))
            raise _StopForward

        with torch.no_grad():
            with _passing_through(layers, self.layer_kwargs):
                self._run_model(batches[:1])
            handle = layers[0].register_forward_pre_hook(keep_hidden, with_kwargs=True)
            for chunk in batches.split(batch_size):
                self._run_model(chunk)
            handle.remove()
        self._dense_next: list[torch.Tensor] | None = None

    def _run_model(self, input_ids: torch.Tensor) -> None:
        with contextlib.suppress(_StopForward):
            self.model(input_ids=input_ids.to(self.model.get_input_embeddings().weight.device), use_cache=False)

    @torch.no_grad()
    def collect(self, modules: dict[str, nn.Linear]) -> dict[str, InputStats]:
        """Run the current layer on every batch and return the input statistics of `modules`."""
        stats = {name: InputStats.empty(module.in_features, module.weight.device) for name, module in modules.items()}
        handles = [module.register_forward_pre_hook(lambda m, args, s=stats[name]: s.add(args[0]))
                   for name, module in modules.items()]
        try:
            self._dense_next = self._forward()
        finally:
            for h in handles:
                h.remove()
        return stats

    @torch.no_grad()
    def advance(self, *, recompute: bool, layer: nn.Module | None = None) -> None:
        """Move to the next layer. recompute=True reruns the (possibly pruned) current layer, or `layer` in
        its place; otherwise the outputs seen by the last `collect` (the unpruned layer) are used."""
        if recompute or self._dense_next is None:
            self.hidden = self._forward(layer)
        else:
            self.hidden = self._dense_next
        self._dense_next = None
        self.layer += 1

    def _forward(self, layer: nn.Module | None = None) -> list[torch.Tensor]:
        layer = self.adapter.layers(self.model)[self.layer] if layer is None else layer
        device = next(layer.parameters()).device  # where the walk has put it
        kwargs = _moved(self.layer_kwargs[self.layer], device)
        return [_first(layer(h.to(device), **kwargs)).to(self.store) for h in self.hidden]


@contextlib.contextmanager
def _passing_through(layers: nn.ModuleList, kwargs_of: list[dict]) -> Iterator[None]:
    """Every layer records its keyword inputs and returns its hidden states unchanged; the last one stops the
    forward (the model's head is not needed)."""
    def pass_through(idx: int):
        def forward(hidden_states, *args, **kwargs):
            kwargs_of[idx] = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            if idx == len(layers) - 1:
                raise _StopForward
            return hidden_states
        return forward

    for idx, layer in enumerate(layers):
        layer.forward = pass_through(idx)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _moved(value, device: torch.device):
    """`value` (tensors in tuples, lists and dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def first_order_saliency(model: nn.Module, adapter: FamilyAdapter, batches: torch.Tensor, *,
                         batch_size: int = 4, progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, w * dL/dw for every weight (L = calibration LM loss, summed over batches).

    A unit's first-order loss change when removed is the sum of this over its coupled weights.
    """
    layers = adapter.layers(model)
    params = [dict(layer.named_parameters()) for layer in layers]
    model.zero_grad(set_to_none=True)
    for chunk in tqdm(batches.split(batch_size), desc="gradients", disable=not progress):
        chunk = chunk.to(model.device)
        model(input_ids=chunk, labels=chunk, use_cache=False).loss.backward()
    saliency = [{name: (p.detach() * p.grad).detach() for name, p in layer_params.items() if p.grad is not None}
                for layer_params in params]
    model.zero_grad(set_to_none=True)
    return saliency

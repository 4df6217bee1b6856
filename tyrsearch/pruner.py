"""One-shot structural pruning: a per-layer plan, a criterion, calibration batches -> a smaller model.

This is the *pruner* third of the Torch-Pruning split: it walks the layers in order, asks the criterion
(importance) what to keep and the adapter (structure) to cut it. With `sequential=True` layer l is
calibrated on the outputs of the already pruned layers < l.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from tyrsearch import allocation
from tyrsearch.calibration import InputStats, LayerInputs, first_order_saliency
from tyrsearch.errors import UserError
from tyrsearch.local import Criterion, make_criterion
from tyrsearch.models import ATTENTION_UNITS, MLP, Q_HEADS, FamilyAdapter, KeptUnits, LayerShape, adapter_for
from tyrsearch.streaming import Stream, on_device, release


def dims_of(model: nn.Module) -> allocation.Dims:
    return adapter_for(model).dims(model)


def check_plan(plan: list[LayerShape], dense: list[LayerShape], adapter: FamilyAdapter) -> None:
    """A plan may only shrink the unit types this family can prune."""
    if len(plan) != len(dense):
        raise UserError(f"the plan has {len(plan)} layers but the model has {len(dense)}")
    for i, (want, have) in enumerate(zip(plan, dense, strict=True)):
        for unit in ("kv_groups", "q_heads", "mlp"):
            if want.units(unit) > have.units(unit):
                raise UserError(f"layer {i}: cannot keep {want.units(unit)} {unit}, it has {have.units(unit)}")
            if want.units(unit) < have.units(unit) and unit not in adapter.unit_types:
                raise UserError(f"layer {i}: {unit} are not prunable here ({adapter.not_prunable.get(unit, '')})")


def _block(unit: str) -> str:
    """The block whose consumer input carries a unit type's statistics."""
    return "attention" if unit in ATTENTION_UNITS else "mlp"


def _unit_saliency(adapter: FamilyAdapter, saliency: dict, shape: LayerShape, unit: str,
                   head_dim: int) -> torch.Tensor:
    """[U] summed w * dL/dw over every weight coupled to each unit."""
    view = adapter.group(saliency, shape, unit, head_dim=head_dim)
    total = view.consumer.double().sum(dim=(0, 2))
    for producer in view.producers:
        total = total + producer.double().sum(dim=(1, 2))
    return total


def prune(model: nn.Module, plan: list[LayerShape], criterion: Criterion, batches: torch.Tensor, *,
          sequential: bool = True, batch_size: int = 8, stream: Stream | None = None,
          progress: bool = True) -> nn.Module:
    """Cut `model` in place to the shapes of `plan`, layer by layer (each streamed to `stream.device` when
    given: see `tyrsearch.streaming`)."""
    adapter = adapter_for(model)
    head_dim = adapter.head_dim(model)
    stream = stream or Stream()
    check_plan(plan, adapter.shapes(model), adapter)
    saliency = (first_order_saliency(model, adapter, batches, batch_size=batch_size, progress=progress)
                if criterion.needs_gradients else None)
    inputs = LayerInputs(model, adapter, batches, batch_size=batch_size, offload=stream.offload) \
        if criterion.needs_stats else None
    layers = adapter.layers(model)
    for idx in tqdm(range(len(layers)), desc=f"pruning ({criterion.name})", disable=not progress):
        dense = list(layers[idx].parameters())
        with on_device(layers[idx], stream.device) as layer:
            target, device = plan[idx], next(layer.parameters()).device
            stats: dict[str, InputStats] = {}
            if inputs is not None:
                consumers = {"attention": adapter.consumer(layer, Q_HEADS), "mlp": adapter.consumer(layer, MLP)}
                stats = inputs.collect({block: c for block, c in consumers.items() if c is not None})
            changed = False
            for unit in adapter.unit_types:
                shape = adapter.shape(layer)
                keep = target.units(unit)
                if keep == shape.units(unit):
                    continue
                stats_key = _block(unit)
                group = adapter.group(layer.state_dict(), shape, unit, head_dim=head_dim)
                if stats_key in stats:
                    s = stats[stats_key]
                    group = replace(group, xtx=s.xtx, x_sum=s.x_sum, tokens=s.tokens)
                if saliency is not None:
                    unit_saliency = _unit_saliency(adapter, saliency[idx], shape, unit, head_dim)
                    group = replace(group, saliency=unit_saliency.to(device))
                selection = criterion.select(group, keep) if keep else KeptUnits(kept=torch.zeros(0, dtype=torch.long))
                adapter.prune_layer_(layer, unit, selection, layer_idx=idx, head_dim=head_dim)
                changed = True
                # the surviving units' statistics and saliencies are unchanged: keep them, cut like the weights
                if stats_key in stats:
                    stats[stats_key] = stats[stats_key].select(group.columns(selection.kept))
                if saliency is not None:
                    saliency[idx], _ = adapter.slice(saliency[idx], shape, unit, KeptUnits(kept=selection.kept),
                                                     head_dim=head_dim)
            if inputs is not None and idx + 1 < len(layers):
                inputs.advance(recompute=sequential and changed)
        kept = {id(p) for p in layers[idx].parameters()}
        release(p for p in dense if id(p) not in kept)  # the dense weights that the cut replaced
    return model


def outlier_ratios(model: nn.Module, batches: torch.Tensor, *, batch_size: int = 8,
                   stream: Stream | None = None) -> list[float]:
    """OWL's per-layer outlier ratio on the dense model (one calibration pass)."""
    adapter = adapter_for(model)
    stream = stream or Stream()
    inputs = LayerInputs(model, adapter, batches, batch_size=batch_size, offload=stream.offload)
    ratios = []
    for dense_layer in adapter.layers(model):
        with on_device(dense_layer, stream.device) as layer:
            ratios.append(_outlier_ratio(adapter, layer, inputs))
        inputs.advance(recompute=False)
    return ratios


def _outlier_ratio(adapter: FamilyAdapter, layer: nn.Module, inputs: LayerInputs) -> float:
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    if attn is None or mlp is None:
        raise UserError("owl measures outliers of a dense model: this one has layers without attention or "
                        "MLP (or routed experts); use --allocation uniform or knapsack")
    stats = inputs.collect({"q": attn.q, "o": attn.o, "gate": mlp.gate, "down": mlp.down})
    norm = {k: s.xtx.diagonal().clamp_min(0).sqrt() for k, s in stats.items()}
    pairs = [(attn.q.weight, norm["q"]), (attn.k.weight, norm["q"]), (attn.v.weight, norm["q"]),
             (attn.o.weight, norm["o"]), (mlp.gate.weight, norm["gate"]), (mlp.up.weight, norm["gate"]),
             (mlp.down.weight, norm["down"])]
    return allocation.outlier_ratio(pairs)


@dataclass(frozen=True)
class OneShotConfig:
    """Everything `one_shot` needs besides the model and the calibration batches."""

    criterion: str = "osscar"
    sparsity: float = 0.3
    allocation: str = "uniform"
    attention_sparsity: float = 0.0
    sequential: bool = True
    seed: int = 0
    batch_size: int = 8


def plan_for(model: nn.Module, config: OneShotConfig, batches: torch.Tensor, *,
             stream: Stream | None = None) -> list[LayerShape]:
    """The per-layer shapes that `config.allocation` gives for `config.sparsity`."""
    adapter = adapter_for(model)
    dense, dims = adapter.shapes(model), dims_of(model)
    if config.allocation == "uniform":
        return allocation.uniform(dense, sparsity=config.sparsity, attention_sparsity=config.attention_sparsity,
                                  dims=dims)
    if config.allocation == "owl":
        allocation.check_sparsity(config.sparsity)
        ratios = outlier_ratios(model, batches, batch_size=config.batch_size, stream=stream)
        return allocation.owl(dense, sparsity=config.sparsity, outlier_ratios=ratios,
                              attention_sparsity=config.attention_sparsity, dims=dims)
    raise UserError(f"unknown allocation {config.allocation!r}: choose one of {', '.join(allocation.ALLOCATIONS)}")


def one_shot(model: nn.Module, config: OneShotConfig, batches: torch.Tensor, *, stream: Stream | None = None,
             progress: bool = True) -> dict:
    """Prune `model` in place (streamed as `stream` says); returns what was done (shapes before/after,
    sparsity, times)."""
    adapter = adapter_for(model)
    criterion = make_criterion(config.criterion, seed=config.seed)
    dense = adapter.shapes(model)
    start = time.perf_counter()
    try:
        plan = plan_for(model, config, batches, stream=stream)
    except allocation.Infeasible as exc:
        raise exc.as_parameter_error() from None
    allocated = time.perf_counter()
    prune(model, plan, criterion, batches, sequential=config.sequential, batch_size=config.batch_size,
          stream=stream, progress=progress)
    done = time.perf_counter()
    return {
        "criterion": config.criterion,
        "allocation": config.allocation,
        "target_sparsity": config.sparsity,
        "attention_sparsity": config.attention_sparsity,
        "achieved_sparsity": allocation.sparsity_of(adapter.shapes(model), dense, dims_of(model)),
        "sequential": config.sequential,
        "layers": [s.block_config() for s in adapter.shapes(model)],
        "time_s": {"allocation": allocated - start, "pruning": done - allocated},
    }

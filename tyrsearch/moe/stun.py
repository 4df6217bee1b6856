"""STUN: structured-then-unstructured pruning of Mixture-of-Experts decoders (Lee et al.).

    report = stun_prune(model, batches, config=StunConfig(experts_keep=0.75, sparsity=0.5))
    save_pruned(model, tokenizer, "out/")          # per-layer expert counts; reloads with from_pretrained

1. Calibration (`tyrsearch.moe.stats`): ONE pass over the calibration batches with forward hooks collects
   the experts' co-selection counts and the input norms that Wanda needs.
2. Expert stage (`tyrsearch.moe.experts`): a method chosen by name (stun, frequency, random; none
   keeps every expert) decides which experts each MoE layer keeps, `experts_keep` of them in total. The
   family adapter cuts the others with their router rows. With `merge`, each cluster of at most
   `merge_max_size` experts first becomes the average of its members (weighted by how often each was
   selected; router rows too) in the kept expert's place.
3. Unstructured stage (`tyrsearch.moe.unstructured`): wanda or owl (or none) zeroes weights inside
   what was kept, per output row, until the total sparsity is the target; or 2:4 in every matrix.

Sparsity. The *counted* weights of a decoder are, in every decoder layer, the attention projections'
weights (q/k/v/o), in MoE layers the router and the routed experts' gate_up and down weights, in dense
MLP layers the gate/up/down weights: the parameters `tyrsearch.allocation.Dims` counts. Embeddings,
lm_head, norms, biases and Qwen2-MoE's shared expert (with its gate) are not counted and never pruned.
*Total sparsity* (what `sparsity` targets) is the fraction of the dense model's counted weights that are
removed or zero; a removed expert's weights and router row count as removed. The expert stage removes
its share, experts = removed / dense. The unstructured stage covers the kept counted weights except the
routers (attention and expert matrices alike) and zeroes (target * dense - removed) of them, so
unstructured = zeros / dense and total = experts + unstructured; the report measures all three by
counting. With `semi_structured` (2:4) the stage zeroes half of the covered weights, which fixes the total.
The calibration statistics are the dense model's: a kept expert's norms are over the tokens
routed to it in the dense model (also when it was merged with its cluster).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tyrsearch.allocation import check_sparsity
from tyrsearch.errors import ParameterError, UserError, mention
from tyrsearch.models import EXPERTS, Experts, FamilyAdapter, KeptUnits, adapter_for
from tyrsearch.moe import stats as calibration
from tyrsearch.moe.experts import ExpertLayer, KeptExperts, check_keep, make_selector, proportional_counts
from tyrsearch.moe.unstructured import STAGES, Matrix, make_stage, prune_

METHODS = ("stun", "frequency", "random", "none")
SEMI_STRUCTURED_SPARSITY = 0.5  # 2:4


@dataclass(frozen=True)
class StunConfig:
    """What `stun_prune` does besides the model and the calibration batches."""

    experts_keep: float | int | None = None  # float in (0, 1]: share of all routed experts; int: a count; None: all
    sparsity: float | None = None  # total target; None with unstructured none or semi_structured (2:4 fixes it)
    method: str = "stun"  # expert selection: stun, frequency, random, none
    unstructured: str = "wanda"  # wanda, owl, none
    semi_structured: bool = False  # 2:4 in every covered matrix (wanda scores)
    router_weight: float = 0.0  # stun: share of the router-row distance in the expert distance
    merge: bool = False  # stun: average small clusters instead of keeping their representative
    merge_max_size: int = 2  # stun with merge: clusters of at most this many experts are averaged
    seed: int = 0  # random
    batch_size: int = 8  # sequences per model call in the calibration pass


def parse_keep(text: str) -> float | int:
    """experts_keep as text: a number with a decimal point is a share of the experts (0.75), else a count (24)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ParameterError("experts_keep", f"{text!r} is neither a share (0.75) nor a count of experts (24)") \
            from None


def moe_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose MLP is a routed Mixture-of-Experts block."""
    adapter = adapter_for(model)
    return [i for i, layer in enumerate(adapter.layers(model)) if adapter.experts(layer) is not None]


def counted_weights(adapter: FamilyAdapter, layer: nn.Module) -> list[torch.Tensor]:
    """The weights of one decoder layer that sparsity counts (see the module docstring)."""
    attn, mlp, experts = adapter.attention(layer), adapter.mlp(layer), adapter.experts(layer)
    weights = []
    if attn is not None:
        weights += [attn.q.weight, attn.k.weight, attn.v.weight, attn.o.weight]
    if experts is not None:
        weights += [experts.router, experts.gate_up, experts.down]
    elif mlp is not None:
        weights += [mlp.gate.weight, mlp.up.weight, mlp.down.weight]
    return weights


def _expert_counts(adapter: FamilyAdapter, layers: nn.ModuleList) -> list[int | None]:
    """Routed experts per decoder layer, None in a dense-MLP layer."""
    return [None if (e := adapter.experts(layer)) is None else e.count for layer in layers]


def _numel(adapter: FamilyAdapter, layer: nn.Module) -> int:
    return sum(w.numel() for w in counted_weights(adapter, layer))


def _nonzero(adapter: FamilyAdapter, layer: nn.Module) -> int:
    return sum(int(torch.count_nonzero(w)) for w in counted_weights(adapter, layer))


@dataclass(frozen=True)
class WeightBudget:
    """The global figures a configuration implies, known before the calibration pass."""

    keep: int  # experts kept in total
    dense: int  # counted weights of the dense model
    removed: int  # counted weights the expert stage removes (experts and their router rows)
    unstructured: float  # the share of the covered weights the unstructured stage zeroes


def check_settings(config: StunConfig) -> None:
    """Every mistake in `config` alone, as a ParameterError naming the setting: before the model is loaded."""
    if config.method not in METHODS:
        raise ParameterError("method", f"{config.method!r} is unknown: choose one of {', '.join(METHODS)}")
    if config.unstructured not in STAGES:
        raise ParameterError("unstructured", f"{config.unstructured!r} is unknown: choose one of {', '.join(STAGES)}")
    if config.merge and config.method != "stun":
        raise ParameterError("merge", f"averages the experts of a STUN cluster: it needs {mention('method')} stun")
    _check_keep_setting(config)
    if config.method != "none":
        make_selector(config.method, router_weight=config.router_weight, seed=config.seed)
    elif config.unstructured == "none":
        raise ParameterError("method", f"none and {mention('unstructured')} none prune nothing: choose an expert "
                                       "method, an unstructured stage or both")
    _check_sparsity_target(config)


def check_config(model: nn.Module, config: StunConfig) -> WeightBudget:
    """Every mistake a user can make, as a UserError (a ParameterError when one setting is wrong), before any
    work; the budget otherwise."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    moe = moe_layers(model)
    if not moe:
        raise UserError(f"{model.config.model_type!r} has no Mixture-of-Experts layers: stun prunes Mixtral, "
                        "Qwen2-MoE and OLMoE models (turn a dense model into one with `tyrsearch moefy`)")
    check_settings(config)
    blocks = [adapter.experts(layers[i]) for i in moe]
    experts = [b.count for b in blocks]
    top_k = [b.top_k for b in blocks]
    keep = round(config.experts_keep * sum(experts)) if isinstance(config.experts_keep, float) \
        else config.experts_keep or sum(experts)  # method none: every expert
    if config.method != "none":
        make_selector(config.method, router_weight=config.router_weight, seed=config.seed).check(top_k)
        check_keep(experts, top_k, keep)
        if config.method in ("frequency", "random"):
            proportional_counts(experts, top_k, keep)
    if config.semi_structured:
        _check_2_4(adapter, layers)
    target = config.sparsity if config.unstructured != "none" and not config.semi_structured else None

    # one expert's counted weights: its router row and its gate_up and down slices
    per_expert = {sum(w[0].numel() for w in (b.router, b.gate_up, b.down)) for b in blocks}
    if len(per_expert) > 1:  # the MoE adapter never cuts inside experts, so one model's experts are alike
        raise ValueError("experts of different sizes across layers: the expert stage's share is not fixed")
    dense = sum(_numel(adapter, layer) for layer in layers)
    removed = (sum(experts) - keep) * per_expert.pop()
    router_rows = keep * blocks[0].router.shape[1]
    covered = dense - removed - router_rows
    if target is None:
        return WeightBudget(keep=keep, dense=dense, removed=removed,
                      unstructured=SEMI_STRUCTURED_SPARSITY if config.semi_structured else 0.0)
    zeros = round(target * dense) - removed
    if zeros < 0:
        raise ParameterError("sparsity", f"{target} is below the expert stage's share: removing "
                                         f"{sum(experts) - keep} of {sum(experts)} experts alone removes "
                                         f"{removed / dense:.4f} of the weights; raise {mention('sparsity')} or keep "
                                         "more experts")
    if zeros >= covered:
        raise ParameterError("sparsity", f"{target} would zero every weight the expert stage keeps; lower "
                                         f"{mention('sparsity')}")
    return WeightBudget(keep=keep, dense=dense, removed=removed, unstructured=zeros / covered)


def _check_keep_setting(config: StunConfig) -> None:
    keep = config.experts_keep
    if config.method == "none":
        if keep is not None:
            raise ParameterError("method", f"none keeps every expert: drop {mention('experts_keep')}")
        return
    if keep is None:
        raise ParameterError("method", f"{config.method} needs {mention('experts_keep')} (a share like 0.75 or a "
                                       "count)")
    if isinstance(keep, bool) or not isinstance(keep, float | int):
        raise ParameterError("experts_keep", f"{keep!r} is neither a share (0.75) nor a count of experts (24)")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ParameterError("experts_keep", f"{keep} as a share must be in (0, 1]; give a count as a whole "
                                                 "number")
    elif keep < 1:
        raise ParameterError("experts_keep", f"{keep}: keep at least one expert per MoE layer")


def _check_sparsity_target(config: StunConfig) -> None:
    if config.semi_structured:
        if config.unstructured != "wanda":
            raise ParameterError("semi_structured", f"prunes 2:4 by wanda scores: use {mention('unstructured')} "
                                                    "wanda (owl's layer sparsities do not apply: 2:4 is 50% in "
                                                    "every matrix)")
        if config.sparsity is not None:
            raise ParameterError("semi_structured", "fixes the unstructured stage at 2:4 (50% of every matrix): "
                                                    f"drop {mention('sparsity')}, the total is reported")
        return
    if config.unstructured == "none":
        if config.sparsity is not None:
            raise ParameterError("unstructured", "none zeroes nothing, so the total is the expert stage's share: "
                                                 f"drop {mention('sparsity')} or choose {mention('unstructured')} "
                                                 "wanda or owl")
        return
    if config.sparsity is None:
        raise ParameterError("unstructured", f"{config.unstructured} needs {mention('sparsity')}, the total "
                                             "sparsity to reach")
    check_sparsity(config.sparsity)


def _check_2_4(adapter: FamilyAdapter, layers: nn.ModuleList) -> None:
    """2:4 zeroes 2 of every 4 inputs of each pruned matrix, so every input size must divide by 4."""
    for i, layer in enumerate(layers):
        for weight in counted_weights(adapter, layer):
            rows, cols = weight.shape[-2:]
            if cols % 4:
                raise ParameterError("semi_structured", f"needs input sizes divisible by 4 (2:4 sparsity); a {rows} "
                                                        f"x {cols} matrix of layer {i} is not: drop "
                                                        f"{mention('semi_structured')}")


def _expert_layer(experts: Experts, stats: calibration.LayerStats) -> ExpertLayer:
    return ExpertLayer(co_selection=stats.co_selection, router=experts.router.detach(),
                       gate_up=experts.gate_up.detach(), down=experts.down.detach(), top_k=experts.top_k)


@torch.no_grad()
def _merge_(experts: Experts, kept: KeptExperts, frequency: torch.Tensor, *, max_size: int) -> None:
    """Write each small cluster's frequency-weighted average (uniform if none was used) into its kept expert."""
    for cluster in kept.clusters:
        if not 2 <= len(cluster) <= max_size:
            continue
        members = list(cluster)
        weight = frequency[members].double()
        weight = weight / weight.sum() if weight.sum() > 0 else torch.full_like(weight, 1 / len(members))
        for param in (experts.router, experts.gate_up, experts.down):
            stacked = param.detach()[members].double()  # [members, ...]
            average = (stacked * weight.view(-1, *[1] * (stacked.dim() - 1))).sum(0)
            param.detach()[cluster[0]] = average.to(param.dtype)


def _matrices(adapter: FamilyAdapter, layer: nn.Module, stats: calibration.LayerStats) -> list[Matrix]:
    """What the unstructured stage prunes in one layer: every counted weight but the router, with its norms."""
    attn, mlp, experts = adapter.attention(layer), adapter.mlp(layer), adapter.experts(layer)
    matrices = []
    if attn is not None:
        x = stats.norms(calibration.ATTENTION_IN)
        matrices += [Matrix(attn.q.weight.detach(), x), Matrix(attn.k.weight.detach(), x),
                     Matrix(attn.v.weight.detach(), x), Matrix(attn.o.weight.detach(), stats.norms(calibration.O_IN))]
    if experts is not None:
        x, mid = stats.norms(calibration.EXPERT_IN), stats.norms(calibration.EXPERT_MID)  # [E, hidden], [E, I]
        gate_up, down = experts.gate_up.detach(), experts.down.detach()
        for e in range(experts.count):
            matrices += [Matrix(gate_up[e], x[e]), Matrix(down[e], mid[e])]  # [2I, hidden], [hidden, I]
    elif mlp is not None:
        x, mid = stats.norms(calibration.MLP_IN), stats.norms(calibration.MLP_MID)
        matrices += [Matrix(mlp.gate.weight.detach(), x), Matrix(mlp.up.weight.detach(), x),
                     Matrix(mlp.down.weight.detach(), mid)]
    return matrices


def _remove_experts_(model: nn.Module, stats: list[calibration.LayerStats], config: StunConfig, *,
                     keep: int) -> tuple[list[list[list[int]]], float | None]:
    """The expert stage: keep `keep` experts in all (`config.method` picks them), in place; the layers'
    statistics follow the renumbered experts. Returns each MoE layer's clusters and stun's threshold."""
    adapter = adapter_for(model)
    layers, moe = adapter.layers(model), moe_layers(model)
    selector = make_selector(config.method, router_weight=config.router_weight, seed=config.seed)
    plan = selector.select([_expert_layer(adapter.experts(layers[i]), stats[i]) for i in moe], keep)
    clusters = []
    for i, kept in zip(moe, plan.layers, strict=True):
        if config.merge:
            _merge_(adapter.experts(layers[i]), kept, stats[i].co_selection.diagonal(), max_size=config.merge_max_size)
        index = torch.tensor(kept.kept)
        adapter.prune_layer_(layers[i], EXPERTS, KeptUnits(kept=index), layer_idx=i, head_dim=adapter.head_dim(model))
        stats[i] = stats[i].keep_experts(index)
        clusters.append([list(c) for c in kept.clusters])
    return clusters, plan.info.get("threshold")


def stun_prune(model: nn.Module, batches: torch.Tensor, *, config: StunConfig, progress: bool = False) -> dict:
    """Prune `model` in place (experts, then unstructured zeros); returns what was done, measured:

    experts: per decoder layer the dense and kept expert counts (None in dense-MLP layers), per MoE layer the
        tokens that selected each dense expert and the clusters (kept expert first), stun's threshold;
    sparsity: total, experts and unstructured as fractions of the dense counted weights, counted after
        pruning (total = experts + unstructured); the unstructured stage's share of the weights it covers
        and its per-layer shares; each layer's total;
    calibration: sequences, tokens and model calls (forward_passes) of the one pass; time_s per stage.
    """
    start = time.perf_counter()
    adapter = adapter_for(model)
    budget = check_config(model, config)
    layers = adapter.layers(model)
    dense_numel = [_numel(adapter, layer) for layer in layers]
    dense_experts = _expert_counts(adapter, layers)

    stats, calls = calibration.collect(model, adapter, batches, batch_size=config.batch_size, progress=progress)
    calibrated = time.perf_counter()

    moe = moe_layers(model)
    selected = [stats[i].co_selection.diagonal().tolist() for i in moe]  # tokens that selected each dense expert
    clusters, threshold = _remove_experts_(model, stats, config, keep=budget.keep) if config.method != "none" \
        else ([], None)
    experts_done = time.perf_counter()

    matrices = [_matrices(adapter, layer, s) for layer, s in zip(layers, stats, strict=True)]
    sparsities = make_stage(config.unstructured).layer_sparsities(matrices, budget.unstructured)
    prune_(matrices, sparsities, semi_structured=config.semi_structured)
    done = time.perf_counter()

    nonzero = [_nonzero(adapter, layer) for layer in layers]
    total = sum(dense_numel)
    removed = total - sum(_numel(adapter, layer) for layer in layers)
    return {
        "config": asdict(config),
        "experts": {
            "dense": dense_experts,
            "kept": _expert_counts(adapter, layers),
            "total_dense": sum(e for e in dense_experts if e), "total_kept": budget.keep,
            "selected": selected, "clusters": clusters, "threshold": threshold,
        },
        "sparsity": {
            "target": config.sparsity,
            "total": 1 - sum(nonzero) / total,
            "experts": removed / total,
            "unstructured": (total - removed - sum(nonzero)) / total,
            "unstructured_stage": budget.unstructured,
            "unstructured_stage_per_layer": sparsities,
            "per_layer": [1 - n / d if d else 0.0 for n, d in zip(nonzero, dense_numel, strict=True)],
        },
        "counted_weights": {"dense": total, "nonzero": sum(nonzero)},
        "calibration": {"sequences": int(batches.shape[0]), "tokens": int(batches.numel()), "forward_passes": calls},
        "time_s": {"calibration": calibrated - start, "experts": experts_done - calibrated,
                   "unstructured": done - experts_done, "total": done - start},
    }

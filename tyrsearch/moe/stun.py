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
from tyrsearch.errors import UserError
from tyrsearch.modeling import SkippedAttention, SkippedMLP
from tyrsearch.models import EXPERTS, KeptUnits, adapter_for
from tyrsearch.models.moe import is_moe_block
from tyrsearch.moe import stats as calibration
from tyrsearch.moe.experts import ExpertLayer, KeptExperts, check_keep, make_selector, proportional_counts
from tyrsearch.moe.unstructured import Matrix, make_stage, prune_

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
    """--experts-keep: a number with a decimal point is a share of the experts (0.75), else a count (24)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise UserError(f"--experts-keep {text!r} is neither a share (0.75) nor a count of experts (24)") from None


def moe_layers(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose MLP is a routed Mixture-of-Experts block."""
    return [i for i, layer in enumerate(adapter_for(model).layers(model)) if is_moe_block(layer.mlp)]


def counted_weights(layer: nn.Module) -> list[torch.Tensor]:
    """The weights of one decoder layer that sparsity counts (see the module docstring)."""
    attn, mlp = layer.self_attn, layer.mlp
    weights = []
    if not isinstance(attn, SkippedAttention):
        weights += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight]
    if is_moe_block(mlp):
        weights += [mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj]
    elif not isinstance(mlp, SkippedMLP):
        weights += [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return weights


def _numel(layer: nn.Module) -> int:
    return sum(w.numel() for w in counted_weights(layer))


def _nonzero(layer: nn.Module) -> int:
    return sum(int(torch.count_nonzero(w)) for w in counted_weights(layer))


@dataclass(frozen=True)
class WeightBudget:
    """The global figures a configuration implies, known before the calibration pass."""

    keep: int  # experts kept in total
    dense: int  # counted weights of the dense model
    removed: int  # counted weights the expert stage removes (experts and their router rows)
    unstructured: float  # the share of the covered weights the unstructured stage zeroes


def check_config(model: nn.Module, config: StunConfig) -> WeightBudget:
    """Every mistake a user can make, as a UserError, before any work; the budget otherwise."""
    layers = adapter_for(model).layers(model)
    moe = moe_layers(model)
    if not moe:
        raise UserError(f"{model.config.model_type!r} has no Mixture-of-Experts layers: stun prunes Mixtral, "
                        "Qwen2-MoE and OLMoE models (turn a dense model into one with `tyrsearch moefy`)")
    if config.method not in METHODS:
        raise UserError(f"unknown --method {config.method!r}: choose one of {', '.join(METHODS)}")
    make_stage(config.unstructured)
    if config.merge and config.method != "stun":
        raise UserError("--merge averages the experts of a STUN cluster: it needs --method stun")
    experts = [layers[i].mlp.gate.weight.shape[0] for i in moe]
    top_k = [layers[i].mlp.gate.top_k for i in moe]
    keep = _keep_count(config, sum(experts))
    if config.method != "none":
        make_selector(config.method, router_weight=config.router_weight, seed=config.seed)
        check_keep(experts, top_k, keep)
        if config.method in ("frequency", "random"):
            proportional_counts(experts, top_k, keep)
    elif config.unstructured == "none":
        raise UserError("--method none and --unstructured none prune nothing: choose an expert method, an "
                        "unstructured stage or both")
    target = _check_sparsity_target(config)

    # one expert's counted weights: its router row and its gate_up and down slices
    per_expert = {sum(w[0].numel() for w in (b.gate.weight, b.experts.gate_up_proj, b.experts.down_proj))
                  for b in (layers[i].mlp for i in moe)}
    if len(per_expert) > 1:  # the MoE adapter never cuts inside experts, so one model's experts are alike
        raise ValueError("experts of different sizes across layers: the expert stage's share is not fixed")
    dense = sum(map(_numel, layers))
    removed = (sum(experts) - keep) * per_expert.pop()
    router_rows = keep * layers[moe[0]].mlp.gate.weight.shape[1]
    covered = dense - removed - router_rows
    if target is None:
        return WeightBudget(keep=keep, dense=dense, removed=removed,
                      unstructured=SEMI_STRUCTURED_SPARSITY if config.semi_structured else 0.0)
    zeros = round(target * dense) - removed
    if zeros < 0:
        raise UserError(f"--sparsity {target} is below the expert stage's share: removing "
                        f"{sum(experts) - keep} of {sum(experts)} experts alone removes {removed / dense:.4f} of "
                        "the weights; raise --sparsity or keep more experts")
    if zeros >= covered:
        raise UserError(f"--sparsity {target} would zero every weight the expert stage keeps; lower --sparsity")
    return WeightBudget(keep=keep, dense=dense, removed=removed, unstructured=zeros / covered)


def _keep_count(config: StunConfig, total: int) -> int:
    keep = config.experts_keep
    if config.method == "none":
        if keep is not None:
            raise UserError("--method none keeps every expert: drop --experts-keep")
        return total
    if keep is None:
        raise UserError(f"--method {config.method} needs --experts-keep (a share like 0.75 or a count)")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise UserError(f"--experts-keep {keep} as a share must be in (0, 1]; give a count as a whole number")
        return round(keep * total)
    if keep < 1:
        raise UserError(f"--experts-keep {keep}: keep at least one expert per MoE layer")
    return keep


def _check_sparsity_target(config: StunConfig) -> float | None:
    if config.semi_structured:
        if config.unstructured != "wanda":
            raise UserError("--semi-structured prunes 2:4 by wanda scores: use --unstructured wanda (owl's layer "
                            "sparsities do not apply: 2:4 is 50% in every matrix)")
        if config.sparsity is not None:
            raise UserError("--semi-structured fixes the unstructured stage at 2:4 (50% of every matrix): drop "
                            "--sparsity, the total is reported")
        return None
    if config.unstructured == "none":
        if config.sparsity is not None:
            raise UserError("--unstructured none zeroes nothing, so the total is the expert stage's share: drop "
                            "--sparsity or choose --unstructured wanda or owl")
        return None
    if config.sparsity is None:
        raise UserError(f"--unstructured {config.unstructured} needs --sparsity, the total sparsity to reach")
    check_sparsity(config.sparsity)
    return config.sparsity


def _expert_layer(layer: nn.Module, stats: calibration.LayerStats) -> ExpertLayer:
    moe = layer.mlp
    return ExpertLayer(co_selection=stats.co_selection, router=moe.gate.weight.detach(),
                       gate_up=moe.experts.gate_up_proj.detach(), down=moe.experts.down_proj.detach(),
                       top_k=moe.gate.top_k)


@torch.no_grad()
def _merge_(moe: nn.Module, kept: KeptExperts, frequency: torch.Tensor, *, max_size: int) -> None:
    """Write each small cluster's frequency-weighted average (uniform if none was used) into its kept expert."""
    for cluster in kept.clusters:
        if not 2 <= len(cluster) <= max_size:
            continue
        members = list(cluster)
        weight = frequency[members].double()
        weight = weight / weight.sum() if weight.sum() > 0 else torch.full_like(weight, 1 / len(members))
        for param in (moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj):
            stacked = param.detach()[members].double()  # [members, ...]
            average = (stacked * weight.view(-1, *[1] * (stacked.dim() - 1))).sum(0)
            param.detach()[cluster[0]] = average.to(param.dtype)


def _matrices(layer: nn.Module, stats: calibration.LayerStats) -> list[Matrix]:
    """What the unstructured stage prunes in one layer: every counted weight but the router, with its norms."""
    attn, mlp = layer.self_attn, layer.mlp
    matrices = []
    if not isinstance(attn, SkippedAttention):
        x = stats.norms(calibration.ATTENTION_IN)
        matrices += [Matrix(attn.q_proj.weight.detach(), x), Matrix(attn.k_proj.weight.detach(), x),
                     Matrix(attn.v_proj.weight.detach(), x),
                     Matrix(attn.o_proj.weight.detach(), stats.norms(calibration.O_IN))]
    if is_moe_block(mlp):
        x, mid = stats.norms(calibration.EXPERT_IN), stats.norms(calibration.EXPERT_MID)  # [E, hidden], [E, I]
        gate_up, down = mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach()
        for e in range(gate_up.shape[0]):
            matrices += [Matrix(gate_up[e], x[e]), Matrix(down[e], mid[e])]  # [2I, hidden], [hidden, I]
    elif not isinstance(mlp, SkippedMLP):
        x, mid = stats.norms(calibration.MLP_IN), stats.norms(calibration.MLP_MID)
        matrices += [Matrix(mlp.gate_proj.weight.detach(), x), Matrix(mlp.up_proj.weight.detach(), x),
                     Matrix(mlp.down_proj.weight.detach(), mid)]
    return matrices


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
    dense_numel = [_numel(layer) for layer in layers]
    dense_experts = [layer.mlp.gate.weight.shape[0] if is_moe_block(layer.mlp) else None for layer in layers]

    stats, calls = calibration.collect(model, adapter, batches, batch_size=config.batch_size, progress=progress)
    calibrated = time.perf_counter()

    moe = moe_layers(model)
    selected = [stats[i].co_selection.diagonal().tolist() for i in moe]  # tokens that selected each dense expert
    clusters, threshold = [], None
    if config.method != "none":
        selector = make_selector(config.method, router_weight=config.router_weight, seed=config.seed)
        plan = selector.select([_expert_layer(layers[i], stats[i]) for i in moe], budget.keep)
        threshold = plan.info.get("threshold")
        for i, kept in zip(moe, plan.layers, strict=True):
            if config.merge:
                _merge_(layers[i].mlp, kept, stats[i].co_selection.diagonal(), max_size=config.merge_max_size)
            index = torch.tensor(kept.kept)
            adapter.prune_layer_(layers[i], EXPERTS, KeptUnits(kept=index), layer_idx=i,
                                 head_dim=adapter.head_dim(model))
            stats[i] = stats[i].keep_experts(index)
            clusters.append([list(c) for c in kept.clusters])
    experts_done = time.perf_counter()

    matrices = [_matrices(layer, s) for layer, s in zip(layers, stats, strict=True)]
    sparsities = make_stage(config.unstructured).layer_sparsities(matrices, budget.unstructured)
    prune_(matrices, sparsities, semi_structured=config.semi_structured)
    done = time.perf_counter()

    nonzero = [_nonzero(layer) for layer in layers]
    total = sum(dense_numel)
    removed = total - sum(map(_numel, layers))
    return {
        "config": asdict(config),
        "experts": {
            "dense": dense_experts,
            "kept": [layer.mlp.gate.weight.shape[0] if is_moe_block(layer.mlp) else None for layer in layers],
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

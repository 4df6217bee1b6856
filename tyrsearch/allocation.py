"""One-shot allocations: how many units each layer keeps for a global sparsity target.

Sparsity is the fraction of the decoder layers' prunable parameters removed (q/k/v/o and
gate/up/down weights, in MoE layers those of every routed expert and its router row; embeddings,
lm_head and norms excluded). These are the baselines that the
global search has to beat.

Attention is pruned at its own rate (`attention_sparsity`, rounded to whole heads and groups, 0 by
default: the best uniform split measured on SmolLM2 leaves attention dense); MLP channels make up the
rest of each layer's share.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tyrsearch.errors import ParameterError, mention
from tyrsearch.models import LayerShape

ALLOCATIONS = ("uniform", "owl")


@dataclass(frozen=True)
class Dims:
    """The dense sizes that turn units into parameters."""

    hidden: int
    head_dim: int

    def attention_params(self, shape: LayerShape) -> int:
        # q and o: q_heads * head_dim x hidden each; k and v: kv_heads * head_dim x hidden each
        return self.hidden * self.head_dim * (2 * shape.q_heads + 2 * shape.kv_heads) if shape.q_heads else 0

    def mlp_params(self, shape: LayerShape) -> int:
        # gate, up and down: hidden x intermediate each, in every routed expert of an MoE layer, which
        # also has a router row per expert (a shared expert is never pruned: not counted, like norms)
        if shape.experts:
            return shape.experts * (3 * self.hidden * shape.intermediate + self.hidden)
        return 3 * self.hidden * shape.intermediate

    def params(self, shape: LayerShape) -> int:
        return self.attention_params(shape) + self.mlp_params(shape)


def sparsity_of(plan: list[LayerShape], dense: list[LayerShape], dims: Dims) -> float:
    return 1 - sum(map(dims.params, plan)) / sum(map(dims.params, dense))


class Infeasible(ValueError):  # noqa: N818 (a condition, not a failure: the search tries another centre)
    """No allocation of this kind reaches the sparsity. Where a user asked for it, it becomes a
    `ParameterError` (`as_parameter_error`); the search's centre finder takes it as "too far" instead."""

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(problem)
        self.parameter, self.problem = parameter, problem

    def as_parameter_error(self) -> ParameterError:
        return ParameterError(self.parameter, self.problem)


def check_sparsity(sparsity: float, *, parameter: str = "sparsity") -> None:
    if not 0 <= sparsity < 1:
        raise ParameterError(parameter, f"must be in [0, 1), got {sparsity}: it is the fraction of decoder "
                                        "parameters removed")


def _attention_shape(shape: LayerShape, attention_sparsity: float, dims: Dims) -> LayerShape:
    """The (kv_heads, q_per_kv) closest to the wanted attention size; ties keep more KV groups."""
    goal = (1 - attention_sparsity) * dims.attention_params(shape)
    options = [shape.with_units("kv_groups", kv).with_units("q_heads", q)
               for kv, q in itertools.product(range(1, shape.kv_heads + 1), range(1, shape.q_per_kv + 1))]
    return min(options, key=lambda s: (abs(dims.attention_params(s) - goal), -s.kv_heads))


def layer_plan(dense: list[LayerShape], layer_sparsity: list[float], *, attention_sparsity: float,
               dims: Dims) -> list[LayerShape]:
    """Each layer loses `layer_sparsity[i]` of its parameters: attention at its rate, MLP the rest."""
    check_sparsity(attention_sparsity, parameter="attention_sparsity")
    plan = []
    for i, (shape, s) in enumerate(zip(dense, layer_sparsity, strict=True)):
        attn = _attention_shape(shape, attention_sparsity, dims) if attention_sparsity else shape
        mlp_removed = s * dims.params(shape) - (dims.attention_params(shape) - dims.attention_params(attn))
        keep = round(shape.intermediate - mlp_removed / (3 * dims.hidden))
        if keep < 1:
            raise Infeasible("sparsity", f"{s:.3f} in layer {i} would remove every MLP channel (attention "
                             f"sparsity {attention_sparsity}); lower {mention('sparsity')} or raise "
                             f"{mention('attention_sparsity')}")
        if keep > shape.intermediate:
            raise Infeasible("attention_sparsity", f"{attention_sparsity} alone removes more than layer {i}'s "
                             f"share ({s:.3f}); lower {mention('attention_sparsity')}")
        plan.append(attn.with_units("mlp", keep))
    return plan


def uniform(dense: list[LayerShape], *, sparsity: float, attention_sparsity: float = 0.0,
            dims: Dims) -> list[LayerShape]:
    """The same sparsity in every layer."""
    check_sparsity(sparsity)
    return layer_plan(dense, [sparsity] * len(dense), attention_sparsity=attention_sparsity, dims=dims)


def uniform_experts(dense: list[LayerShape], *, sparsity: float, dims: Dims) -> list[LayerShape]:
    """The same share of routed experts removed in every MoE layer (attention dense), so that `sparsity`
    of the decoder's parameters go; dense MLP layers stay."""
    check_sparsity(sparsity)
    experts = sum(dims.mlp_params(s) for s in dense if s.experts)
    share = sparsity * sum(map(dims.params, dense)) / experts if experts else 1.0  # of the experts' parameters
    if share >= 1:
        raise Infeasible("sparsity", f"{sparsity} would remove every routed expert; lower it")
    return [s.with_units("experts", max(1, round(s.experts * (1 - share)))) if s.experts else s for s in dense]


def outlier_ratio(weights_and_norms: list[tuple[torch.Tensor, torch.Tensor]], *, m: float = 5.0) -> float:
    """OWL's layer outlier ratio: the share of |W_ij| * ||x_j|| above m times the layer's mean."""
    scores = torch.cat([(w.abs().double() * norm[None, :]).reshape(-1) for w, norm in weights_and_norms])
    return (scores > m * scores.mean()).double().mean().item()


def owl(dense: list[LayerShape], *, sparsity: float, outlier_ratios: list[float], lam: float = 0.08,
        attention_sparsity: float = 0.0, dims: Dims) -> list[LayerShape]:
    """Outlier-weighted layerwise sparsity (Yin et al. 2024): more outliers, less pruning.

    Layer densities spread linearly over [0, 2 * lam] by outlier ratio, then shifted so the mean
    density is 1 - sparsity (layers have equal size in the supported families).
    """
    check_sparsity(sparsity)
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = (ratios - ratios.min()) / (ratios.max() - ratios.min()).clamp_min(1e-12) * 2 * lam
    density = spread - spread.mean() + (1 - sparsity)
    layer_sparsity = (1 - density).clamp(0, 1).tolist()
    return layer_plan(dense, layer_sparsity, attention_sparsity=attention_sparsity, dims=dims)

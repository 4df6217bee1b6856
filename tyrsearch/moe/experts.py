"""Which experts to keep: the seam for expert-selection methods, chosen by name like the local criteria.

A method sees each MoE layer as plain tensors (`ExpertLayer`) and a global number of experts to keep,
and returns per layer the kept experts and the cluster each one stands for (`ExpertPlan`). It never cuts
anything: the pipeline (`tyrsearch.moe.stun`) hands the plan to the family adapter.

- `stun` (Lee et al., STUN): experts that behave alike are redundant. Distance between experts i and j:

      d_co(i, j) = (1 - npmi_ij) / 2               npmi: co-selection normalised against chance,
      npmi_ij    = log(p_ij / (p_i p_j)) / -log p_ij   p_ij = C_ij / T, p_i = C_ii / T, C the co-selection
                                                   counts over T tokens: 1 always together, 0 as often as
                                                   independent choices would be, -1 never together
      d_r(i, j)  = (1 - cos(router_i, router_j)) / 2
      d          = (1 - w) d_co + w d_r            w: `router_weight`, every term in [0, 1]

  Normalising against chance matters: with skewed routing the most used experts are co-selected for
  most tokens just by being popular, and a plain overlap (cosine or Jaccard of the selection sets)
  calls them alike. (Measured on MoEfied SmolLM2, 8 experts, top-2, keeping 6 per layer: held-out
  ppl 11546 with the cosine, 1330 with npmi, 1351 dropping the least used; dense 1315.) An expert the
  calibration tokens never selected is at d_co 0 from every expert: nothing tells it apart, and
  removing it changes nothing on those tokens.

  Per layer, greedy complete-linkage clustering: merge the two clusters whose farthest members are
  closest, recording the merge height; a layer stops at top-k clusters (every token needs k experts).
  Complete linkage never merges lower than an earlier merge, so cutting a layer's merges at a threshold t
  is a prefix of them, and one global t sets every layer's count. Bisection on t finds the smallest
  merge height at which the layers together make the merges the global count needs; merges at exactly
  that height (ties) are taken in layer order until the count is exact. Each cluster keeps the expert
  nearest the centroid of its members' flattened weights (gate_up and down), with its router row, among
  the members the calibration tokens selected (all, if none was); ties (every 2-expert cluster is one)
  go to the more often selected expert, then to the lower index.
- `frequency`: drop the least used experts (fewest tokens select them).
- `random`: seeded.
  Both keep the same share of experts in every layer (each layer's count proportional to its experts,
  largest remainders first, so the counts add up to the global count).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from tyrsearch.errors import ParameterError, UserError, mention

# relative slack under which two centroid distances count as equal (2-expert clusters: equal up to rounding)
_TIE = 1e-9


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer as a selection method sees it."""

    co_selection: torch.Tensor  # [E, E] int64: tokens whose top-k holds both experts; diagonal: tokens selecting one
    router: torch.Tensor  # [E, hidden]
    gate_up: torch.Tensor  # [E, 2I, hidden]
    down: torch.Tensor  # [E, hidden, I]
    top_k: int

    @property
    def experts(self) -> int:
        return self.router.shape[0]

    @property
    def frequency(self) -> torch.Tensor:
        """[E] tokens that selected each expert."""
        return self.co_selection.diagonal()


@dataclass(frozen=True)
class KeptExperts:
    """One layer's outcome: `kept` ascending; clusters[i] holds kept[i] and the removed experts it stands for."""

    kept: tuple[int, ...]
    clusters: tuple[tuple[int, ...], ...]

    @classmethod
    def singletons(cls, kept: list[int]) -> KeptExperts:
        kept = sorted(kept)
        return cls(kept=tuple(kept), clusters=tuple((k,) for k in kept))


@dataclass(frozen=True)
class ExpertPlan:
    layers: list[KeptExperts]
    info: dict = field(default_factory=dict)  # what the method reports (stun: the threshold)


class ExpertSelector(ABC):
    name: ClassVar[str]

    @abstractmethod
    def select(self, layers: list[ExpertLayer], keep: int) -> ExpertPlan:
        """Keep `keep` experts in total over `layers`, at least top-k in each (checked by `check_keep`)."""

    def check(self, top_k: list[int]) -> None:  # noqa: B027 (most methods work with any routing)
        """Raise a ParameterError, before any work, if the method cannot choose with this routing (top-k of
        each MoE layer)."""


def check_keep(experts: list[int], top_k: list[int], keep: int) -> None:
    """A global expert count that every method can meet: between sum(top-k) and all experts."""
    if keep > sum(experts):
        raise ParameterError("experts_keep", f"is too high: cannot keep {keep} experts: the model has {sum(experts)} "
                                             f"routed experts in {len(experts)} MoE layers")
    if keep < sum(top_k):
        raise ParameterError("experts_keep", f"is too low: cannot keep {keep} experts: every token is routed to top-k "
                                             f"experts in each MoE layer, so at least {sum(top_k)} must stay "
                                             f"({', '.join(map(str, top_k))} per layer)")


def proportional_counts(experts: list[int], top_k: list[int], keep: int) -> list[int]:
    """Each layer's share of `keep`, proportional to its experts (largest remainders, earlier layers first)."""
    total = sum(experts)
    exact = [keep * e / total for e in experts]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(experts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: keep - sum(counts)]:
        counts[i] += 1
    for i, (count, k) in enumerate(zip(counts, top_k, strict=True)):
        if count < k:
            raise ParameterError("experts_keep", f"is too low: keeping {keep} experts in proportion leaves MoE layer "
                                                 f"{i} with {count}, fewer than its top-k ({k}); raise it to at least "
                                                 f"{k / experts[i]:.3f} of the experts")
    return counts


class FrequencyExperts(ExpertSelector):
    name = "frequency"

    def select(self, layers: list[ExpertLayer], keep: int) -> ExpertPlan:
        counts = proportional_counts([x.experts for x in layers], [x.top_k for x in layers], keep)
        # stable sort on -frequency: among equally used experts the lower index stays
        return ExpertPlan([KeptExperts.singletons(torch.argsort(-x.frequency, stable=True)[:n].tolist())
                           for x, n in zip(layers, counts, strict=True)])


class RandomExperts(ExpertSelector):
    name = "random"

    def __init__(self, *, seed: int = 0):
        self.seed = seed

    def select(self, layers: list[ExpertLayer], keep: int) -> ExpertPlan:
        counts = proportional_counts([x.experts for x in layers], [x.top_k for x in layers], keep)
        gen = torch.Generator().manual_seed(self.seed)
        return ExpertPlan([KeptExperts.singletons(torch.randperm(x.experts, generator=gen)[:n].tolist())
                           for x, n in zip(layers, counts, strict=True)])


def npmi(co_selection: torch.Tensor) -> torch.Tensor:
    """[E, E] float64 normalised pointwise mutual information of co-selection, in [-1, 1]."""
    counts = co_selection.double()
    # a token selecting k experts adds k to the trace and k^2 to the sum: tokens = trace^2 / sum
    tokens = counts.diagonal().sum() ** 2 / counts.sum()
    p_pair, p = counts / tokens, counts.diagonal() / tokens
    pmi = torch.log(p_pair / (p[:, None] * p[None, :]))
    value = torch.where(p_pair < 1, pmi / -torch.log(p_pair), 1.0)  # p_pair == 1: both always selected
    return torch.where(p_pair > 0, value, -1.0)  # never together (log 0)


def expert_distance(layer: ExpertLayer, *, router_weight: float) -> torch.Tensor:
    """[E, E] float64 in [0, 1], zero diagonal: (1 - w) d_co + w d_r (see the module docstring)."""
    d_co = (1 - npmi(layer.co_selection)) / 2
    unused = layer.frequency == 0
    d_co[unused], d_co[:, unused] = 0.0, 0.0
    rows = layer.router.double()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    d_router = ((1 - rows @ rows.T) / 2).clamp(0, 1)
    distance = (1 - router_weight) * d_co + router_weight * d_router
    return distance.fill_diagonal_(0)


@dataclass(frozen=True)
class Merge:
    height: float  # complete-linkage distance of the two clusters
    a: int  # the clusters' labels (their lowest expert); the merged cluster is labelled min(a, b)
    b: int


def complete_linkage(distance: torch.Tensor, *, min_clusters: int) -> list[Merge]:
    """Greedy complete-linkage merges of E items down to `min_clusters` clusters, heights non-decreasing."""
    labels = list(range(distance.shape[0]))
    linkage = distance.double().clone()  # [n, n] cluster-to-cluster: the largest member distance
    linkage.fill_diagonal_(float("inf"))
    merges = []
    while len(labels) > min_clusters:
        flat = int(torch.argmin(linkage))  # the first minimum in row-major order: deterministic ties
        i, j = sorted(divmod(flat, len(labels)))
        merges.append(Merge(height=float(linkage[i, j]), a=labels[i], b=labels[j]))
        merged = torch.maximum(linkage[i], linkage[j])
        linkage[i], linkage[:, i] = merged, merged
        linkage[i, i] = float("inf")
        keep = [k for k in range(len(labels)) if k != j]
        linkage = linkage[keep][:, keep]
        labels = [min(labels[i], labels[j]) if k == i else labels[k] for k in keep]
    return merges


def clusters_after(experts: int, merges: list[Merge]) -> list[list[int]]:
    """The clusters left after applying `merges` in order, each ascending, ordered by lowest member."""
    members = {e: [e] for e in range(experts)}
    for merge in merges:
        joined = sorted(members.pop(merge.a) + members.pop(merge.b))
        members[joined[0]] = joined
    return [members[label] for label in sorted(members)]


def global_threshold(heights: list[list[float]], merges: int) -> tuple[float | None, list[int]]:
    """Bisection on the threshold t over the layers' merge heights (each non-decreasing): the smallest t at
    which the layers' merges of height <= t number at least `merges`. Returns t (None if no merge is
    needed) and how many merges each layer makes: every merge below t, and merges at exactly t in layer
    order until the total is exactly `merges`."""
    if merges == 0:
        return None, [0] * len(heights)
    candidates = sorted({h for layer in heights for h in layer})

    def made(t: float) -> int:
        return sum(sum(h <= t for h in layer) for layer in heights)

    lo, hi = 0, len(candidates) - 1  # made(candidates[hi]) is every merge, >= merges (check_keep)
    while lo < hi:
        mid = (lo + hi) // 2
        if made(candidates[mid]) >= merges:
            hi = mid
        else:
            lo = mid + 1
    threshold = candidates[lo]
    counts = [sum(h < threshold for h in layer) for layer in heights]
    for i, layer in enumerate(heights):
        ties = sum(h == threshold for h in layer)
        take = min(ties, merges - sum(counts))
        counts[i] += take
    return threshold, counts


def representative(layer: ExpertLayer, members: list[int]) -> int:
    """The selected member nearest the centroid of the members' flattened weights; ties: most selected, then
    lowest index."""
    n, freq = len(members), layer.frequency
    weights = torch.cat([layer.gate_up[members].reshape(n, -1), layer.down[members].reshape(n, -1)], dim=1)
    distance = (weights.double() - weights.double().mean(0)).norm(dim=1)  # [n]
    used = [i for i, m in enumerate(members) if freq[m] > 0] or range(n)
    best = min(distance[i] for i in used)
    nearest = [members[i] for i in used if distance[i] <= best * (1 + _TIE)]
    return min(nearest, key=lambda m: (-int(freq[m]), m))


class StunExperts(ExpertSelector):
    name = "stun"

    def __init__(self, *, router_weight: float = 0.0):
        if not 0 <= router_weight <= 1:
            raise ParameterError("router_weight", f"must be in [0, 1], got {router_weight}: it mixes the router-row "
                                                  "distance into the co-selection distance")
        self.router_weight = router_weight

    def check(self, top_k: list[int]) -> None:
        if self.router_weight == 0 and 1 in top_k:
            raise ParameterError("router_weight", "0 cannot tell experts apart with top-1 routing (no two are ever "
                                                  f"co-selected): give {mention('router_weight')} > 0 so that the "
                                                  "router rows do")

    def select(self, layers: list[ExpertLayer], keep: int) -> ExpertPlan:
        self.check([x.top_k for x in layers])
        dendrograms = [complete_linkage(expert_distance(x, router_weight=self.router_weight), min_clusters=x.top_k)
                       for x in layers]
        needed = sum(x.experts for x in layers) - keep
        threshold, counts = global_threshold([[m.height for m in d] for d in dendrograms], needed)
        kept = []
        for layer, dendrogram, count in zip(layers, dendrograms, counts, strict=True):
            clusters = [(representative(layer, c), c) for c in clusters_after(layer.experts, dendrogram[:count])]
            clusters.sort()
            kept.append(KeptExperts(kept=tuple(r for r, _ in clusters),
                                    clusters=tuple((r, *(m for m in c if m != r)) for r, c in clusters)))
        return ExpertPlan(kept, info={"threshold": threshold})


SELECTORS: dict[str, type[ExpertSelector]] = {cls.name: cls for cls in (StunExperts, FrequencyExperts, RandomExperts)}


def make_selector(name: str, *, router_weight: float = 0.0, seed: int = 0) -> ExpertSelector:
    """The expert-selection method called `name` (stun takes `router_weight`, random `seed`)."""
    if name == StunExperts.name:
        return StunExperts(router_weight=router_weight)
    if name == RandomExperts.name:
        return RandomExperts(seed=seed)
    if name == FrequencyExperts.name:
        return FrequencyExperts()
    raise UserError(f"unknown expert-selection method {name!r}: choose one of {', '.join(SELECTORS)}, none")

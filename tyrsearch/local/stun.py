"""STUN as a local criterion: which experts of one MoE layer to keep, by how alike they behave.

The supernet gives it the layer's expert group with the co-selection counts its router produced on the
calibration tokens. Complete linkage over the STUN distance (`tyrsearch.moe.experts`) merges the
experts down to the fewest kept; cutting the merges at `keep` clusters, each cluster keeps the expert
nearest its centroid. One dendrogram serves every level, so the variants are nested like the global
STUN's. This is how the global search chooses per-layer expert counts instead of STUN's threshold.
"""

from __future__ import annotations

import torch

from tyrsearch.errors import UserError
from tyrsearch.local.base import Criterion
from tyrsearch.models import KeptUnits, UnitGroup
from tyrsearch.moe.experts import ExpertLayer, clusters_after, complete_linkage, expert_distance, representative


class Stun(Criterion):
    name = "stun"

    def select(self, group: UnitGroup, keep: int) -> KeptUnits:
        return self.select_many(group, [keep])[keep]

    def select_many(self, group: UnitGroup, keeps: list[int]) -> dict[int, KeptUnits]:
        if group.coselection is None:
            raise UserError("the stun criterion keeps MoE experts by their co-selection: search the `experts` "
                            "unit of an MoE model with it, or choose another --criterion")
        layer = ExpertLayer(co_selection=group.coselection,
                            router=group.producers[0][:, 0],  # [E, 1, hidden] -> [E, hidden]
                            gate_up=group.producers[1],  # [E, 2I, hidden]
                            down=group.consumer.permute(1, 0, 2),  # [hidden, E, I] -> [E, hidden, I]
                            top_k=min(keeps))
        merges = complete_linkage(expert_distance(layer, router_weight=0.0), min_clusters=min(keeps))
        return {keep: KeptUnits(kept=torch.tensor(sorted(representative(layer, cluster) for cluster in
                                                         clusters_after(layer.experts, merges[:layer.experts - keep]))))
                for keep in set(keeps)}

"""The supernet: every layer locally pruned at a grid of levels, stored compactly, assembled on demand.

For each layer and searched unit type, level l keeps `centre - l * step` units (l in -L..L, clipped to
[min_keep, all]). A level step is a fixed count of units per unit type, so moving one layer up a level
and another down keeps the global count exact (away from the clip bounds).

Variants are built in layer order with *expectation error accumulation*: layer l is calibrated on the
outputs of layers < l at their centre variant (the expected network), not on the dense model's.

On disk: one safetensors shard per (layer, unit type) holding, per level, the kept unit indices and the
reconstructed consumer slice (and bias shift) only, plus `manifest.json` with the model and calibration
fingerprints, the criterion, the grid and the sha256 of every shard. Loading verifies the checksums.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tyrsearch.atomic import atomic_folder
from tyrsearch.calibration import LayerInputs
from tyrsearch.errors import UserError
from tyrsearch.local import Criterion
from tyrsearch.models import ATTENTION_UNITS, EXPERTS, MLP, Q_HEADS, Experts, KeptUnits, LayerShape, adapter_for
from tyrsearch.moe.stats import co_selection
from tyrsearch.space import SearchSpace

MANIFEST = "manifest.json"


def fingerprint(tensors: list[torch.Tensor]) -> str:
    """sha256 over the bytes of `tensors` (model weights, calibration tokens)."""
    digest = hashlib.sha256()
    for t in tensors:
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype (numpy has no bfloat16)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def level_keeps(*, centre: int, step: int, levels: int, min_keep: int, units: int) -> list[int]:
    """Units kept at levels -L..L (index 0 is level -L)."""
    return [min(max(centre - level * step, min_keep), units) for level in range(-levels, levels + 1)]


@dataclass
class Supernet:
    """Variants per (layer, unit type, level); `grid[layer][unit]` lists the units kept per level."""

    grid: list[dict[str, list[int]]]
    levels: int
    variants: dict[tuple[int, str, int], KeptUnits]  # (layer, unit, level) -> selection
    manifest: dict

    def selection(self, layer: int, unit: str, level: int) -> KeptUnits:
        return self.variants[(layer, unit, level)]

    def keep(self, layer: int, unit: str, level: int) -> int:
        """Units kept at `level` (q_heads: per KV group)."""
        return self.grid[layer][unit][level + self.levels]

    def apply(self, model: nn.Module, levels: list[dict[str, int]]) -> nn.Module:
        """Cut `model` (dense, same weights as at build time) in place to the given level per layer.
        A level that keeps every unit leaves that block dense."""
        adapter = adapter_for(model)
        head_dim = adapter.head_dim(model)
        for idx, layer in enumerate(adapter.layers(model)):
            for unit, level in levels[idx].items():
                if self.keep(idx, unit, level) < adapter.shape(layer).units(unit):
                    adapter.prune_layer_(layer, unit, self.selection(idx, unit, level), layer_idx=idx,
                                         head_dim=head_dim)
        return model

    # -- storage --------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the shards and the manifest into `folder`, atomically (temp folder, then rename)."""
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            shards = {}
            for idx, units in enumerate(self.grid):
                for unit, keeps in units.items():
                    tensors = {}  # one variant per distinct kept count: clipped levels share it
                    for level, keep in zip(range(-self.levels, self.levels + 1), keeps, strict=True):
                        sel = self.selection(idx, unit, level)
                        tensors[f"{keep}.kept"] = sel.kept.contiguous()
                        if sel.consumer is not None:
                            tensors[f"{keep}.consumer"] = sel.consumer.cpu().contiguous()
                        if sel.bias_shift is not None:
                            tensors[f"{keep}.bias_shift"] = sel.bias_shift.cpu().contiguous()
                    name = f"layer{idx:03d}.{unit}.safetensors"
                    save_file(tensors, tmp / name)
                    shards[name] = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
            manifest = {**self.manifest, "grid": self.grid, "levels": self.levels, "shards": shards}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        self.manifest = manifest
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Supernet:
        """Read a saved supernet; a missing, truncated or altered shard is a UserError."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"supernet {folder} has no readable {MANIFEST}: rebuild it") from None
        variants = {}
        for name, sha in manifest["shards"].items():
            path = folder / name
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
                raise UserError(f"supernet shard {path} is missing or corrupt (checksum mismatch): "
                                "rebuild the supernet")
            idx, unit = int(name[5:8]), name.split(".")[1]
            tensors = load_file(path)
            keeps = manifest["grid"][idx][unit]
            for level, keep in zip(range(-manifest["levels"], manifest["levels"] + 1), keeps, strict=True):
                variants[(idx, unit, level)] = KeptUnits(kept=tensors[f"{keep}.kept"],
                                                         consumer=tensors.get(f"{keep}.consumer"),
                                                         bias_shift=tensors.get(f"{keep}.bias_shift"))
        return cls(grid=manifest["grid"], levels=manifest["levels"], variants=variants, manifest=manifest)


@dataclass
class _Counts:
    counts: torch.Tensor | None = None  # [E, E] int64


@contextlib.contextmanager
def _coselection(experts: Experts | None) -> Iterator[_Counts]:
    """While open, count which of `experts` the tokens running through them co-select (STUN's statistic:
    the top-k the router hands the experts). None (a layer without experts, or not searched): nothing."""
    found = _Counts()
    if experts is None:
        yield found
        return

    def count(hidden: torch.Tensor, index: torch.Tensor) -> None:  # [T, H], [T, k]
        counts = co_selection(index, experts.count)
        found.counts = counts if found.counts is None else found.counts + counts

    handle = experts.on_routing(count)
    try:
        yield found
    finally:
        handle.remove()


def _in_dtype(selection: KeptUnits, dtype: torch.dtype) -> KeptUnits:
    """A criterion's selection with its refit consumer and bias shift (solved in float64) in `dtype`: what
    cutting casts them to anyway, so nothing is lost and a shard takes the model's bytes per weight."""
    return replace(selection, consumer=None if selection.consumer is None else selection.consumer.to(dtype),
                   bias_shift=None if selection.bias_shift is None else selection.bias_shift.to(dtype))


def build_supernet(model: nn.Module, criterion: Criterion, batches: torch.Tensor, *, space: SearchSpace,
                   centre: list[LayerShape], expectation: bool = True, batch_size: int = 8,
                   progress: bool = True) -> Supernet:
    """Local variants of every layer at every level of `space` around `centre` (the dense model is untouched).

    expectation=True calibrates layer l on layers < l at their centre variant; False on the dense model.
    """
    adapter = adapter_for(model)
    dense_shapes = adapter.shapes(model)
    space.check_model(dense_shapes, adapter.unit_types)
    head_dim = adapter.head_dim(model)
    dtype = next(model.parameters()).dtype  # variants are kept (and stored) in the model's dtype
    inputs = LayerInputs(model, adapter, batches, batch_size=batch_size)
    units = [u for u in adapter.unit_types if u in space.units]
    grid, variants, input_rms = [], {}, []
    for idx, layer in enumerate(tqdm(adapter.layers(model), desc=f"supernet ({criterion.name})",
                                     disable=not progress)):
        input_rms.append(torch.cat(inputs.hidden).float().pow(2).mean().sqrt().item())
        blocks = {"attention": adapter.consumer(layer, Q_HEADS), "mlp": adapter.consumer(layer, MLP)}
        with _coselection(adapter.experts(layer) if EXPERTS in units else None) as coselection:
            stats = inputs.collect({b: c for b, c in blocks.items() if c is not None})
        state, shape = layer.state_dict(), adapter.shape(layer)
        grid.append({})
        for unit in units:
            if unit == EXPERTS and not shape.experts:
                continue  # a dense MLP layer of an MoE model: no experts to search
            spec = space.units[unit]
            keeps = level_keeps(centre=centre[idx].units(unit), step=spec.step, levels=space.levels,
                                min_keep=spec.floor(shape.units(unit)), units=shape.units(unit))
            grid[idx][unit] = keeps
            group = adapter.group(state, shape, unit, head_dim=head_dim)
            if unit == EXPERTS:
                group = replace(group, coselection=coselection.counts)
            else:
                s = stats["attention" if unit in ATTENTION_UNITS else "mlp"]
                group = replace(group, xtx=s.xtx, x_sum=s.x_sum, tokens=s.tokens)
            nonzero = [k for k in keeps if k]
            by_keep = {k: _in_dtype(sel, dtype) for k, sel in criterion.select_many(group, nonzero).items()} \
                if nonzero else {}
            by_keep[0] = KeptUnits(kept=torch.zeros(0, dtype=torch.long))  # the block is removed
            for level, keep in zip(range(-space.levels, space.levels + 1), keeps, strict=True):
                variants[(idx, unit, level)] = by_keep[keep]
        if idx + 1 < len(dense_shapes):
            expected = None
            if expectation:  # a copy of this one layer cut to its centre: the model stays dense
                expected = copy.deepcopy(layer)
                for unit in grid[idx]:
                    adapter.prune_layer_(expected, unit, variants[(idx, unit, 0)], layer_idx=idx, head_dim=head_dim)
            inputs.advance(recompute=expectation, layer=expected)
    manifest = {
        "model": fingerprint(list(model.state_dict().values())),
        "calibration": fingerprint([batches]),
        "criterion": criterion.name,
        "expectation": expectation,
        "input_rms": input_rms,
    }
    return Supernet(grid=grid, levels=space.levels, variants=variants, manifest=manifest)

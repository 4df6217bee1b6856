"""Structural pruning of zoo networks to a FLOPs speedup, and the meta-pruning pipeline around it.

Units (channels, heads) are ranked globally by a score normalised within their group (divided by the
group's mean, Torch-Pruning's `normalizer="mean"`, so that groups of different sizes and layers
compare) and removed lowest first, each group keeping at least `min_units`, until the network's FLOPs
are at most dense / speedup. The pruned network is a fresh network of the smaller config with the kept
slices of every coupled weight (`groups.keep_units`). The project's materializer is not used: its
family adapters cover decoder LMs, not ViTForImageClassification; a ViT layer here keeps fewer whole
heads in its q/k/v/o projections and fewer fc1/fc2 channels, which ViTAttention runs as is.

Methods (`PruneConfig.method`), each with the same number of fine-tuning steps in total:

    meta    metanetwork rewrite -> fine-tune (rewrite_steps) -> group-L2 prune -> fine-tune (finetune_steps)
    l2      group-L2 prune -> fine-tune (rewrite_steps + finetune_steps)
    random  random prune -> fine-tune (rewrite_steps + finetune_steps)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from tyrsearch.errors import UserError
from tyrsearch.meta import data
from tyrsearch.meta.gnn import MetaNet, rewrite
from tyrsearch.meta.graph import layout_for
from tyrsearch.meta.groups import groups_for, keep_units, unit_norms
from tyrsearch.meta.nets import NetConfig, build, flops, resized
from tyrsearch.meta.zoo import FitConfig, accuracy, fit

METHODS = ("meta", "l2", "random")


@dataclass(frozen=True)
class PruneConfig:
    speedup: float = 2.0
    method: str = "meta"
    rewrite_steps: int = 300  # meta: fine-tuning between the rewrite and the pruning
    finetune_steps: int = 600  # after pruning (the baselines also get rewrite_steps)
    batch_size: int = 128
    lr: float = 1e-3
    min_units: int = 1  # units every group keeps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown pruning method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.speedup < 1:
            raise UserError(f"--speedup {self.speedup} must be at least 1 (dense FLOPs / pruned FLOPs)")


def unit_scores(model: nn.Module, config: NetConfig, *, method: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per group name, a score per unit ([size]), normalised to mean 1 within the group; lowest go first."""
    groups = groups_for(config)
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return {group.name: torch.rand(group.size, generator=generator) for group in groups}
    state = model.state_dict()
    with torch.no_grad():
        return {group.name: (norms := unit_norms(state, group)) / norms.mean() for group in groups}


def max_speedup(config: NetConfig, *, min_units: int = 1) -> float:
    """The speedup of keeping `min_units` in every group."""
    smallest = config
    for group in groups_for(config):
        smallest = resized(smallest, group.field, group.index, min(min_units, group.size))
    return flops(config) / flops(smallest)


def check_reachable(config: NetConfig, speedup: float, *, min_units: int = 1) -> None:
    if max_speedup(config, min_units=min_units) < speedup:
        raise UserError(f"a {speedup:g}x speedup is out of reach: keeping {min_units} unit(s) per group gives at "
                        f"most {max_speedup(config, min_units=min_units):.2f}x; ask for less")


def prune_to_speedup(model: nn.Module, config: NetConfig, scores: dict[str, torch.Tensor], *, speedup: float,
                     min_units: int = 1) -> tuple[nn.Module, NetConfig]:
    """The network with the lowest-scored units removed until FLOPs <= flops(config) / speedup."""
    check_reachable(config, speedup, min_units=min_units)
    groups = groups_for(config)
    target = flops(config) / speedup
    ranked = sorted((float(score), g, unit) for g, group in enumerate(groups)
                    for unit, score in enumerate(scores[group.name]))
    removed: list[set[int]] = [set() for _ in groups]
    pruned = config
    for _, g, unit in ranked:
        if flops(pruned) <= target:
            break
        group = groups[g]
        if group.size - len(removed[g]) <= min_units:
            continue
        removed[g].add(unit)
        pruned = resized(pruned, group.field, group.index, group.size - len(removed[g]))
    state = model.state_dict()
    for group, gone in zip(groups, removed, strict=True):
        keep = torch.tensor([u for u in range(group.size) if u not in gone], dtype=torch.long)
        state = keep_units(state, group, keep)
    network = build(pruned).to(next(model.parameters()).dtype)
    network.load_state_dict(state, strict=True)
    return network.eval(), pruned


@torch.no_grad()
def recalibrate(model: nn.Module, split: data.Split, *, batches: int = 20, batch_size: int = 256) -> None:
    """Re-estimate BatchNorm statistics (a cumulative average over `batches` batches): a rewrite or a cut
    changes every channel's input distribution, and stale statistics would misreport the accuracy."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for start in range(0, min(len(split), batches * batch_size), batch_size):
        model(split.images[start:start + batch_size])
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def check_compatible(metanet: MetaNet, config: NetConfig) -> None:
    layout = layout_for(config)
    if (layout.node_dim, layout.edge_dim) != (metanet.config.node_dim, metanet.config.edge_dim):
        raise UserError(f"the metanetwork reads graphs with {metanet.config.node_dim}-dim nodes and "
                        f"{metanet.config.edge_dim}-dim edges, this {config.arch} network makes "
                        f"{layout.node_dim} and {layout.edge_dim}: use a metanetwork trained on a zoo of its kind")


def run(model: nn.Module, config: NetConfig, *, train: data.Split, test: data.Split, prune: PruneConfig,
        metanet: MetaNet | None = None, progress: bool = False) -> tuple[nn.Module, NetConfig, dict]:
    """Prune `model` with `prune.method` to `prune.speedup` and fine-tune it; returns the pruned network,
    its config and a report (test accuracy after every stage, FLOPs, parameters, seconds)."""
    if prune.method == "meta" and metanet is None:
        raise UserError("the meta method needs a trained metanetwork (--meta)")
    check_reachable(config, prune.speedup, min_units=prune.min_units)
    fitting = FitConfig(steps=0, batch_size=prune.batch_size, lr=prune.lr, seed=prune.seed)
    times, tic = {}, time.perf_counter()
    accuracies = {"dense": accuracy(model, test)}
    finetune = prune.rewrite_steps + prune.finetune_steps
    if prune.method == "meta":
        check_compatible(metanet, config)
        model = rewrite(metanet, model, config)
        recalibrate(model, train)
        accuracies["rewritten"] = accuracy(model, test)
        fit(model, train, config=replace(fitting, steps=prune.rewrite_steps), progress=progress,
            desc="fine-tune rewrite")
        accuracies["rewritten_finetuned"] = accuracy(model, test)
        finetune = prune.finetune_steps
        times["rewrite"] = time.perf_counter() - tic
    tic = time.perf_counter()
    scores = unit_scores(model, config, method="random" if prune.method == "random" else "l2", seed=prune.seed)
    pruned, pruned_config = prune_to_speedup(model, config, scores, speedup=prune.speedup, min_units=prune.min_units)
    recalibrate(pruned, train)
    accuracies["pruned"] = accuracy(pruned, test)
    times["prune"] = time.perf_counter() - tic
    tic = time.perf_counter()
    fit(pruned, train, config=replace(fitting, steps=finetune), progress=progress, desc="fine-tune pruned")
    accuracies["final"] = accuracy(pruned, test)
    times["finetune"] = time.perf_counter() - tic
    report = {
        "method": prune.method, "speedup_target": prune.speedup,
        "speedup": flops(config) / flops(pruned_config), "flops_before": flops(config),
        "flops_after": flops(pruned_config),
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in pruned.parameters()),
        "test_accuracy": accuracies, "finetune_steps": prune.rewrite_steps + prune.finetune_steps,
        "test_images": len(test), "seconds": times,
    }
    return pruned, pruned_config, report


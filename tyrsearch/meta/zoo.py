"""Training networks on Fashion-MNIST, saving and loading them, and the zoo the metanetwork learns from.

A saved network is a folder: `model.safetensors` (its state dict) and `net.json` (`arch`, `config` with
every width, `test_accuracy` and how it was made). A zoo is a folder of such networks `net-000/`, ...
and `zoo.json` listing each with its split: "train" networks meta-train the metanetwork, "test"
networks are held out for the benchmark.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tyrsearch.atomic import atomic_folder, write_json
from tyrsearch.errors import UserError
from tyrsearch.meta import data
from tyrsearch.meta.nets import (
    ARCHS,
    NetConfig,
    ResNetConfig,
    ViTNetConfig,
    build,
    config_from_dict,
    config_to_dict,
    flops,
)
from tyrsearch.meta.nets import logits as net_logits

WEIGHTS, INFO, ZOO = "model.safetensors", "net.json", "zoo.json"
# base widths the zoo cycles through: the ResNet's first stage (stages double it), the ViT's hidden size
ZOO_WIDTHS = {"resnet": (8, 12, 16), "vit": (24, 32, 40)}


@dataclass(frozen=True)
class FitConfig:
    steps: int
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0


def warmup_cosine(step: int, *, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(model: nn.Module, split: data.Split, *, config: FitConfig, progress: bool = False,
        desc: str = "train") -> float:
    """Train `model` in place (AdamW, warm-up + cosine learning rate) for `config.steps` batches drawn without
    replacement, epoch by epoch; returns the mean loss of the last 50 steps."""
    if config.steps <= 0:
        return math.nan
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total=config.steps, warmup=max(1, config.steps // 10)))
    batch = min(config.batch_size, len(split))
    order, losses = torch.empty(0, dtype=torch.long), []
    model.train()
    for _ in tqdm(range(config.steps), desc=desc, disable=not progress, leave=False):
        if len(order) < batch:
            order = torch.randperm(len(split), generator=generator)
        index, order = order[:batch], order[batch:]
        loss = F.cross_entropy(net_logits(model, split.images[index]), split.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])


@torch.no_grad()
def accuracy(model: nn.Module, split: data.Split, *, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((net_logits(model, split.images[i:i + batch_size]).argmax(-1)
                       == split.labels[i:i + batch_size]).sum()) for i in range(0, len(split), batch_size))
    return correct / len(split)


def save_net(folder: Path, model: nn.Module, config: NetConfig, info: dict, *, result: dict | None = None) -> None:
    """Write `folder` atomically: the state dict (safetensors), net.json (`config` and `info`) and, if
    given, `result` as result.json."""
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
        (tmp / INFO).write_text(json.dumps({"config": config_to_dict(config), **info}, indent=2) + "\n")
        if result is not None:
            (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def load_net(folder: str | Path) -> tuple[nn.Module, NetConfig, dict]:
    """A saved network (eval mode), its config and the rest of its net.json."""
    folder = Path(folder)
    if not (folder / INFO).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} is not a saved network (no {INFO} and {WEIGHTS}): give a folder written by "
                        "`tyrsearch meta zoo` or `tyrsearch meta prune`")
    info = json.loads((folder / INFO).read_text())
    config = config_from_dict(info.pop("config"))
    model = build(config)
    model.load_state_dict(load_file(folder / WEIGHTS), strict=True)
    return model.eval(), config, info


def zoo_config(arch: str, width: int) -> NetConfig:
    """The zoo's network of base width `width`: ResNet stages (w, 2w, 4w), or a 4-layer ViT of hidden size
    w with 4 heads and 2w MLP channels."""
    if arch == "resnet":
        return ResNetConfig(widths=(width, 2 * width, 4 * width))
    return ViTNetConfig(hidden=width, heads=4, mlp=2 * width, layers=4)


@dataclass(frozen=True)
class ZooConfig:
    arch: str
    count: int
    holdout: int  # networks held out of meta-training (the last ones), for the benchmark
    widths: tuple[int, ...]
    epochs: float = 2.0
    batch_size: int = 128
    lr: float = 2e-3
    train_images: int | None = None  # None: all 60k
    test_images: int | None = None  # None: all 10k

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown --arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if not 0 <= self.holdout < self.count:
            raise UserError(f"--holdout {self.holdout} must leave at least one of the {self.count} networks "
                            "for meta-training")
        for width in self.widths:
            if width < 1:
                raise UserError(f"width {width} must be positive")
            zoo_config(self.arch, width)  # a ViT width that its 4 heads do not divide fails here, not mid-zoo


def read_zoo(folder: str | Path) -> dict:
    """zoo.json of a zoo folder: {"arch", "settings", "nets": [{"name", "split", "test_accuracy", ...}]}."""
    path = Path(folder) / ZOO
    if not path.is_file():
        raise UserError(f"{folder} is not a zoo (no {ZOO}): build one with `tyrsearch meta zoo`")
    return json.loads(path.read_text())


def build_zoo(config: ZooConfig, out: Path, *, progress: bool = False) -> dict:
    """Train `config.count` networks (seed i, base width `widths[i % len]`) into `out`, skipping those a
    previous run with the same settings finished; zoo.json is rewritten after each network."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    zoo = read_zoo(out) if (out / ZOO).is_file() else {"arch": config.arch, "settings": settings, "nets": []}
    if zoo["settings"] != settings:
        raise UserError(f"{out} holds a zoo built with other settings: give the same options to continue it, "
                        "or a new --out")
    train = data.load("train", limit=config.train_images)  # a missing dataset fails before anything is written
    test = data.load("test", limit=config.test_images)
    out.mkdir(parents=True, exist_ok=True)
    steps = max(1, round(config.epochs * len(train) / min(config.batch_size, len(train))))
    done = {net["name"] for net in zoo["nets"]}
    for i in tqdm(range(config.count), desc=f"{config.arch} zoo", disable=not progress):
        name = f"net-{i:03d}"
        if name in done:
            continue
        torch.manual_seed(i)
        net_config = zoo_config(config.arch, config.widths[i % len(config.widths)])
        model = build(net_config)
        fit_config = FitConfig(steps=steps, batch_size=config.batch_size, lr=config.lr, seed=i)
        loss = fit(model, train, config=fit_config, progress=progress, desc=name)
        entry = {"name": name, "split": "test" if i >= config.count - config.holdout else "train",
                 "seed": i, "test_accuracy": accuracy(model, test), "train_loss": loss,
                 "flops": flops(net_config), "params": sum(p.numel() for p in model.parameters())}
        save_net(out / name, model, net_config, {k: v for k, v in entry.items() if k != "name"})
        zoo["nets"].append(entry)
        write_json(out / ZOO, zoo)
    return zoo


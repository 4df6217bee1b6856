"""Meta-training: teach the metanetwork to rewrite networks so that they keep their accuracy while their
structural groups become prunable.

Each step draws one zoo network and a batch of training images; the metanetwork rewrites the network's
graph, the rewritten weights run through the network with torch.func.functional_call (BatchNorm in
training mode, on copies of its buffers), and the loss is

    cross-entropy + sparsity_weight * sum over groups and units of ||unit||_2 / (the same for the input)

the group lasso over exactly the units the structural pruner removes (`groups.py`), normalised by the
input network's value so that the weight is unitless and the same for every network of the zoo.
Training resumes from `checkpoint.safetensors` (metanetwork, AdamW state, the sampling generator and
the step), so an interrupted run ends with the same metanetwork as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from torch_geometric.data import Data
from tqdm.auto import tqdm

from tyrsearch.errors import UserError
from tyrsearch.meta import data
from tyrsearch.meta.gnn import MetaNet, MetaNetConfig
from tyrsearch.meta.graph import GraphLayout, layout_for
from tyrsearch.meta.groups import Group, groups_for, unit_norms
from tyrsearch.meta.nets import NetConfig, logits
from tyrsearch.meta.zoo import load_net, read_zoo, warmup_cosine

CHECKPOINT, WEIGHTS, INFO = "checkpoint.safetensors", "metanet.safetensors", "meta.json"


@dataclass(frozen=True)
class MetaTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    sparsity_weight: float = 2.0  # 0.5 left the groups too dense to beat group-L2 at 3x (benchmarks/meta.py)
    warmup: int = 100  # steps of linear warm-up before the cosine decay
    clip: float = 1.0  # gradient norm clip: one odd network must not blow the metanetwork up
    checkpoint_every: int = 100
    seed: int = 0


@dataclass(frozen=True)
class Member:
    """A zoo network ready for meta-training: its graph, groups and reference group-lasso value."""

    name: str
    model: nn.Module
    layout: GraphLayout
    graph: Data
    groups: list[Group]
    params: frozenset[str]
    reference: float

    @classmethod
    def of(cls, name: str, model: nn.Module, config: NetConfig) -> Member:
        layout = layout_for(config)
        params = dict(model.named_parameters())
        groups = groups_for(config)
        with torch.no_grad():
            reference = float(group_lasso(params, groups))
        return cls(name=name, model=model, layout=layout, graph=layout.to_graph(model.state_dict()), groups=groups,
                   params=frozenset(params), reference=reference)


def group_lasso(state: dict[str, torch.Tensor], groups: list[Group]) -> torch.Tensor:
    """Sum over the groups' units of each unit's L2 norm."""
    return sum(unit_norms(state, group).sum() for group in groups)


def losses(metanet: MetaNet, member: Member, images: torch.Tensor, labels: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, normalised group lasso) of the member rewritten by the metanetwork."""
    x, edge_attr = metanet(member.graph)
    state = member.layout.to_state(x, edge_attr)
    params = {name: state[name] for name in member.params}
    buffers = {name: b.clone() for name, b in member.model.named_buffers()}  # BN updates them in place
    member.model.train()
    ce = F.cross_entropy(logits(member.model, images, params | buffers), labels)
    return ce, group_lasso(params, member.groups) / member.reference


def _save_checkpoint(path: Path, metanet: MetaNet, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                     meta: dict) -> None:
    opt = optimizer.state_dict()
    tensors = {f"metanet.{k}": v.contiguous() for k, v in metanet.state_dict().items()}
    tensors |= {f"optimizer.{i}.{k}": v for i, state in opt["state"].items() for k, v in state.items()}
    tensors["generator"] = generator.get_state()
    metadata = {"meta": json.dumps(meta), "param_groups": json.dumps(opt["param_groups"])}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)


def _load_checkpoint(path: Path, metanet: MetaNet, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator) -> dict:
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    metanet.load_state_dict({k.removeprefix("metanet."): v for k, v in tensors.items() if k.startswith("metanet.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    generator.set_state(tensors["generator"])
    return json.loads(metadata["meta"])


def meta_train(metanet: MetaNet, members: list[Member], split: data.Split, *, config: MetaTrainConfig,
               folder: Path, progress: bool = False) -> list[dict]:
    """Train `metanet` in place, checkpointing into `folder` (and resuming from its checkpoint, which must
    come from the same settings); returns the history: mean losses of each checkpoint interval."""
    optimizer = torch.optim.AdamW(metanet.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    settings = {"train": asdict(config), "metanet": metanet.config.to_dict(), "nets": [m.name for m in members]}
    step, history = 0, []
    if (folder / CHECKPOINT).is_file():
        meta = _load_checkpoint(folder / CHECKPOINT, metanet, optimizer, generator)
        if meta["settings"] != settings:
            raise UserError(f"the checkpoint in {folder} comes from other settings or zoo networks: continue it "
                            "with the same options, or give a new --out")
        step, history = meta["step"], meta["history"]
    folder.mkdir(parents=True, exist_ok=True)
    metanet.train()
    window: list[tuple[float, float]] = []
    bar = tqdm(total=config.steps, initial=step, desc="meta-train", disable=not progress)
    while step < config.steps:
        member = members[int(torch.randint(len(members), (1,), generator=generator))]
        index = torch.randint(len(split), (config.batch_size,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup_cosine(step, total=config.steps, warmup=config.warmup)
        ce, sparsity = losses(metanet, member, split.images[index], split.labels[index])
        optimizer.zero_grad(set_to_none=True)
        (ce + config.sparsity_weight * sparsity).backward()
        nn.utils.clip_grad_norm_(metanet.parameters(), config.clip)
        optimizer.step()
        step += 1
        window.append((ce.item(), sparsity.item()))
        bar.update()
        bar.set_postfix(ce=f"{ce.item():.3f}", sparsity=f"{sparsity.item():.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            history.append({"step": step, "ce": sum(w[0] for w in window) / len(window),
                            "sparsity": sum(w[1] for w in window) / len(window)})
            window = []
            _save_checkpoint(folder / CHECKPOINT, metanet, optimizer, generator,
                             {"step": step, "history": history, "settings": settings})
    bar.close()
    metanet.eval()
    return history


def save_metanet(folder: Path, metanet: MetaNet, info: dict) -> None:
    """metanet.safetensors, then meta.json (the metanetwork's config and `info`): a folder with meta.json
    holds a finished metanetwork."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, meta = folder / f".{WEIGHTS}.tmp", folder / f".{INFO}.tmp"
    save_file({k: v.contiguous() for k, v in metanet.state_dict().items()}, weights)
    meta.write_text(json.dumps({"metanet": metanet.config.to_dict(), **info}, indent=2) + "\n")
    weights.replace(folder / WEIGHTS)
    meta.replace(folder / INFO)


def load_metanet(folder: str | Path) -> tuple[MetaNet, dict]:
    """A trained metanetwork (eval mode) and the rest of its meta.json."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / INFO).is_file():
        raise UserError(f"{folder} holds no trained metanetwork ({WEIGHTS} and {INFO}): train one with "
                        "`tyrsearch meta train`, or let an interrupted training finish with --resume")
    info = json.loads((folder / INFO).read_text())
    metanet = MetaNet(config=MetaNetConfig.from_dict(info.pop("metanet")))
    metanet.load_state_dict(load_file(folder / WEIGHTS), strict=True)
    return metanet.eval(), info


def train_on_zoo(zoo_dir: Path, out: Path, *, config: MetaTrainConfig, hidden: int = 32, layers: int = 3,
                 train_images: int | None = None, progress: bool = False) -> dict:
    """Meta-train a metanetwork on the "train" networks of a zoo and save it into `out` (resuming from a
    checkpoint there); returns meta.json's content."""
    zoo = read_zoo(zoo_dir)
    names = [net["name"] for net in zoo["nets"] if net["split"] == "train"]
    if not names:
        raise UserError(f"the zoo in {zoo_dir} has no networks for meta-training yet: let `tyrsearch meta zoo` "
                        "finish (or --resume it)")
    split = data.load("train", limit=train_images)
    members = [Member.of(name, *load_net(Path(zoo_dir) / name)[:2]) for name in names]
    dims = {(m.layout.node_dim, m.layout.edge_dim) for m in members}
    if len(dims) > 1:
        raise UserError(f"the zoo's networks make graphs of different feature sizes {sorted(dims)}: one zoo "
                        "must hold one architecture with one patch and image size")
    (node_dim, edge_dim), = dims
    torch.manual_seed(config.seed)  # the metanetwork's initialisation
    metanet = MetaNet(config=MetaNetConfig(node_dim=node_dim, edge_dim=edge_dim, hidden=hidden, layers=layers))
    tic = time.perf_counter()
    history = meta_train(metanet, members, split, config=config, folder=out, progress=progress)
    info = {"arch": zoo["arch"], "zoo": str(zoo_dir), "nets": names, "train": asdict(config),
            "train_images": len(split), "history": history, "seconds": time.perf_counter() - tic}
    save_metanet(out, metanet, info)
    return {"metanet": metanet.config.to_dict(), **info}

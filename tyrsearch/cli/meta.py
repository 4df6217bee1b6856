"""`tyrsearch meta`: meta-pruning vision networks with a graph metanetwork."""

from __future__ import annotations

import time
from pathlib import Path

import click

from tyrsearch.api import check_out_dir
from tyrsearch.cli import options
from tyrsearch.errors import UserError


@click.group("meta")
def meta_group() -> None:
    """Meta-pruning with a graph metanetwork, for vision networks trained here on Fashion-MNIST: build a
    zoo of networks, meta-train the metanetwork on it, prune a network with it."""


def _meta_out(out_dir: Path, *, resume: bool, overwrite: bool = False) -> None:
    if not resume:
        check_out_dir(out_dir, overwrite=overwrite)
    elif not out_dir.is_dir():
        raise UserError(f"--resume: {out_dir} does not exist; run without --resume first")


@meta_group.command("zoo")
@click.option("--arch", required=True, type=click.Choice(["resnet", "vit"]),
              help="ResNet-style CNNs (BatchNorm, residual blocks) or small ViTs (transformers' ViT)")
@click.option("--count", required=True, type=click.IntRange(min=1), help="networks to train")
@click.option("--holdout", default=None, type=click.IntRange(min=0),
              help="the last N networks are held out of meta-training, for the benchmark (default: a fifth)")
@click.option("--widths", default=None,
              help="comma-separated base widths the networks cycle through (ResNet: first stage's channels, "
                   "doubled per stage; ViT: hidden size, a multiple of its 4 heads) [default: 8,12,16 / 24,32,40]")
@click.option("--epochs", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@options.images(train="train on the first N training images only (default: all 60000)",
                test="measure test accuracy on the first N test images only (default: all 10000)")
@options.out_dir("the zoo folder")
@click.option("--resume", is_flag=True, help="continue an interrupted zoo in --out (same options)")
@options.quiet()
@options.as_json()
def meta_zoo_command(arch: str, count: int, holdout: int | None, widths: str | None, epochs: float, batch_size: int,
                     lr: float, train_images: int | None, test_images: int | None, out_dir: Path, resume: bool,
                     quiet: bool, as_json: bool) -> None:
    """Train a zoo of networks on Fashion-MNIST (seeds 0.., cycling widths); save each with its accuracy."""
    from tyrsearch.meta.zoo import ZOO_WIDTHS, ZooConfig, build_zoo

    try:
        parsed = tuple(int(w) for w in widths.split(",")) if widths else ZOO_WIDTHS[arch]
    except ValueError:
        raise UserError(f"--widths {widths!r} is not a comma-separated list of integers, e.g. 8,12,16") from None
    config = ZooConfig(arch=arch, count=count, holdout=count // 5 if holdout is None else holdout, widths=parsed,
                       epochs=epochs, batch_size=batch_size, lr=lr, train_images=train_images,
                       test_images=test_images)
    _meta_out(out_dir, resume=resume)
    tic = time.perf_counter()
    zoo = build_zoo(config, out_dir, progress=not quiet)
    options.emit({"out": str(out_dir), "arch": arch, "networks": len(zoo["nets"]),
           "train": sum(n["split"] == "train" for n in zoo["nets"]),
           "test": sum(n["split"] == "test" for n in zoo["nets"]),
           "test_accuracy": {n["name"]: n["test_accuracy"] for n in zoo["nets"]},
           "seconds": round(time.perf_counter() - tic, 1)}, as_json)


@meta_group.command("train")
@click.option("--zoo", "zoo_dir", required=True, type=click.Path(path_type=Path),
              help="a zoo from `tyrsearch meta zoo` (its train networks are used)")
@options.out_dir("folder for metanet.safetensors, meta.json and the checkpoint")
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="images per step")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--sparsity-weight", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="weight of the group-lasso regulariser (1.0 = the input network's own value)")
@click.option("--hidden", default=32, show_default=True, type=click.IntRange(min=1), help="metanetwork width")
@click.option("--layers", default=3, show_default=True, type=click.IntRange(min=1),
              help="metanetwork message-passing layers")
@click.option("--train-images", default=None, type=click.IntRange(min=1),
              help="the first N training images only (default: all 60000)")
@click.option("--checkpoint-every", default=100, show_default=True, type=click.IntRange(min=1))
@options.seed()
@click.option("--resume", is_flag=True, help="continue from the checkpoint in --out (same options)")
@options.quiet("no progress bar")
@options.as_json()
def meta_train_command(zoo_dir: Path, out_dir: Path, steps: int, batch_size: int, lr: float, sparsity_weight: float,
                       hidden: int, layers: int, train_images: int | None, checkpoint_every: int, seed: int,
                       resume: bool, quiet: bool, as_json: bool) -> None:
    """Meta-train the metanetwork: rewritten zoo networks keep their accuracy while their channel / head
    groups become prunable (cross-entropy + group lasso, through torch.func.functional_call)."""
    from tyrsearch.meta.train import MetaTrainConfig, train_on_zoo
    from tyrsearch.meta.zoo import read_zoo

    read_zoo(zoo_dir)  # a wrong --zoo fails before anything is written
    _meta_out(out_dir, resume=resume)
    config = MetaTrainConfig(steps=steps, batch_size=batch_size, lr=lr, sparsity_weight=sparsity_weight,
                             checkpoint_every=checkpoint_every, seed=seed, warmup=min(100, steps // 10))
    info = train_on_zoo(zoo_dir, out_dir, config=config, hidden=hidden, layers=layers, train_images=train_images,
                        progress=not quiet)
    last = info["history"][-1]
    options.emit({"out": str(out_dir), "arch": info["arch"], "nets": len(info["nets"]), "steps": steps,
           "ce": last["ce"], "sparsity": last["sparsity"], "seconds": round(info["seconds"], 1)}, as_json)


@meta_group.command("prune")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="a saved network (a zoo's net-NNN folder, or an earlier output)")
@click.option("--meta", "meta_dir", default=None, type=click.Path(path_type=Path),
              help="a metanetwork from `tyrsearch meta train` (needed by --method meta)")
@click.option("--method", default="meta", show_default=True, type=click.Choice(["meta", "l2", "random"]),
              help="meta: rewrite, fine-tune, group-L2 prune, fine-tune; l2 / random: prune, fine-tune")
@click.option("--speedup", default=2.0, show_default=True, type=float, help="dense FLOPs / pruned FLOPs, at least")
@click.option("--rewrite-steps", default=300, show_default=True, type=click.IntRange(min=0),
              help="fine-tuning steps after the rewrite (the other methods add them to --finetune-steps)")
@click.option("--finetune-steps", default=600, show_default=True, type=click.IntRange(min=0),
              help="fine-tuning steps after pruning")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@options.images(train="fine-tune on the first N training images only (default: all 60000)",
                test="measure accuracy on the first N test images only (default: all 10000)")
@options.seed()
@options.out_dir("folder for the pruned network (model.safetensors, net.json) and result.json")
@options.overwrite()
@options.quiet()
@options.as_json()
def meta_prune_command(model_dir: Path, meta_dir: Path | None, method: str, speedup: float, rewrite_steps: int,
                       finetune_steps: int, batch_size: int, lr: float, train_images: int | None,
                       test_images: int | None, seed: int, out_dir: Path, overwrite: bool, quiet: bool,
                       as_json: bool) -> None:
    """Prune a network structurally to a FLOPs speedup (channels of CNNs; heads and MLP channels of ViTs)
    and fine-tune it; with --method meta, the metanetwork rewrites it first."""
    from tyrsearch.meta import data
    from tyrsearch.meta.prune import PruneConfig, check_reachable, run
    from tyrsearch.meta.train import load_metanet
    from tyrsearch.meta.zoo import load_net, save_net

    config = PruneConfig(speedup=speedup, method=method, rewrite_steps=rewrite_steps, finetune_steps=finetune_steps,
                         batch_size=batch_size, lr=lr, seed=seed)
    if method == "meta" and meta_dir is None:
        raise UserError("--method meta needs --meta FOLDER (a metanetwork from `tyrsearch meta train`); or choose "
                        "--method l2 or random")
    model, net_config, info = load_net(model_dir)
    check_reachable(net_config, speedup)
    metanet = load_metanet(meta_dir)[0] if method == "meta" else None
    check_out_dir(out_dir, overwrite=overwrite)
    train, test = data.load("train", limit=train_images), data.load("test", limit=test_images)
    pruned, pruned_config, report = run(model, net_config, train=train, test=test, prune=config, metanet=metanet,
                                        progress=not quiet)
    result = {"model": str(model_dir), "meta": str(meta_dir) if metanet else None, "out": str(out_dir), **report}
    save_net(out_dir, pruned, pruned_config,
             {"test_accuracy": report["test_accuracy"]["final"], "pruned_from": str(model_dir)}, result=result)
    options.emit(result, as_json)

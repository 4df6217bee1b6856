"""Meta-pruning against group-L2 and random structural pruning, on held-out zoo networks (Fashion-MNIST).

For each architecture with a zoo and a metanetwork, every held-out network of the zoo (split "test":
never seen in meta-training) is pruned to each speedup (dense / pruned FLOPs) by each method, all with
the same fine-tuning budget:

    meta    metanetwork rewrite -> fine-tune (--rewrite-steps) -> group-L2 prune -> fine-tune (--finetune-steps)
    l2      group-L2 prune -> fine-tune (--rewrite-steps + --finetune-steps)
    random  random prune -> fine-tune (the same)

and its test accuracy and wall time are recorded. The goal: meta beats l2 at 3x on both architectures.
Rows are written as they finish; rerunning skips finished rows, so an interrupted run resumes (other
settings start over).

    .venv/bin/tyrsearch meta zoo --arch resnet --count 10 --out runs/zoo-resnet
    .venv/bin/tyrsearch meta train --zoo runs/zoo-resnet --out runs/meta-resnet
    (the same for vit)
    .venv/bin/python benchmarks/meta.py --resnet runs/zoo-resnet runs/meta-resnet --vit runs/zoo-vit runs/meta-vit
    (README: --nets 2 --speedups 3 --methods meta l2 --name meta_sw2, and --nets 1 with metanetworks at weight 0.5)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from report import environment, load, save

from tyrsearch.meta import data
from tyrsearch.meta.prune import METHODS, PruneConfig, run
from tyrsearch.meta.train import load_metanet
from tyrsearch.meta.zoo import load_net, read_zoo

NAME = "meta"


def table(results: dict) -> str:
    settings = results["settings"]
    lines = ["| arch | speedup | method | networks | test accuracy (mean ± sd) | dense | right after pruning "
             "| seconds / network |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for row in results["rows"]:
        groups.setdefault((row["arch"], row["speedup"], row["method"]), []).append(row)
    means = {}
    for (arch, speedup, method), rows in sorted(groups.items()):
        final = [r["test_accuracy"]["final"] for r in rows]
        means[arch, speedup, method] = statistics.mean(final)
        spread = statistics.stdev(final) if len(final) > 1 else 0.0
        lines.append(
            f"| {arch} | {speedup:g}x | {method} | {len(rows)} | {statistics.mean(final):.4f} ± {spread:.4f} | "
            f"{statistics.mean(r['test_accuracy']['dense'] for r in rows):.4f} | "
            f"{statistics.mean(r['test_accuracy']['pruned'] for r in rows):.4f} | "
            f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    lines.append("")
    for arch in sorted({key[0] for key in means}):
        if (arch, 3.0, "meta") in means and (arch, 3.0, "l2") in means:
            gain = means[arch, 3.0, "meta"] - means[arch, 3.0, "l2"]
            lines.append(f"- {arch} at 3x: meta {'beats' if gain > 0 else 'does not beat'} group-L2 "
                         f"({gain:+.4f} test accuracy).")
    lines.append("")
    lines.append(
        f"Held-out zoo networks, Fashion-MNIST test set ({settings['test_images'] or 10000} images); speedup = "
        f"dense / pruned FLOPs. Every method gets {settings['rewrite_steps'] + settings['finetune_steps']} "
        f"fine-tuning steps of {settings['batch_size']} images (meta: {settings['rewrite_steps']} after the "
        f"rewrite, {settings['finetune_steps']} after pruning). Seconds: the whole prune + fine-tune of one "
        "network in this run, on this machine.")
    return "\n".join(lines) + "\n"


def held_out(zoo_dir: Path, meta_info: dict) -> list[str]:
    names = [net["name"] for net in read_zoo(zoo_dir)["nets"] if net["split"] == "test"]
    seen = set(names) & set(meta_info["nets"])
    if seen:
        sys.exit(f"{', '.join(sorted(seen))} of {zoo_dir} meta-trained the metanetwork: not held out")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet", nargs=2, type=Path, metavar=("ZOO", "META"), help="ResNet zoo and metanetwork")
    parser.add_argument("--vit", nargs=2, type=Path, metavar=("ZOO", "META"), help="ViT zoo and metanetwork")
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--nets", type=int, default=None, help="at most this many held-out networks per arch")
    parser.add_argument("--rewrite-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--name", default=NAME, help="results/NAME.json and .md (another name for trial runs)")
    args = parser.parse_args()
    archs = {arch: dirs for arch, dirs in (("resnet", args.resnet), ("vit", args.vit)) if dirs}
    if not archs:
        parser.error("give --resnet ZOO META and/or --vit ZOO META")

    settings = {"rewrite_steps": args.rewrite_steps, "finetune_steps": args.finetune_steps,
                "batch_size": args.batch_size, "lr": args.lr, "train_images": args.train_images,
                "test_images": args.test_images}
    results = load(args.name)
    if results.get("settings") != settings:
        results = {}  # different settings: start over rather than mix figures
    results.update(settings=settings, environment=environment())
    results.setdefault("rows", [])
    results.setdefault("metanetworks", {})
    train, test = data.load("train", limit=args.train_images), data.load("test", limit=args.test_images)
    for arch, (zoo_dir, meta_dir) in archs.items():
        metanet, info = load_metanet(meta_dir)
        used = {"folder": str(meta_dir), "zoo": str(zoo_dir), "steps": info["train"]["steps"], "nets": info["nets"],
                "seconds": info["seconds"]}
        if results["metanetworks"].get(arch, used) != used:  # another metanetwork: its rows are stale
            results["rows"] = [r for r in results["rows"] if r["arch"] != arch]
        results["metanetworks"][arch] = used
        done = {(r["arch"], r["net"], r["speedup"], r["method"]) for r in results["rows"]}
        for net in held_out(zoo_dir, info)[:args.nets]:
            model, config, _ = load_net(zoo_dir / net)
            for speedup in args.speedups:
                for method in args.methods:
                    if (arch, net, speedup, method) in done:
                        continue
                    prune = PruneConfig(speedup=speedup, method=method, rewrite_steps=args.rewrite_steps,
                                        finetune_steps=args.finetune_steps, batch_size=args.batch_size, lr=args.lr)
                    tic = time.perf_counter()
                    _, _, report = run(model, config, train=train, test=test, prune=prune,
                                       metanet=metanet if method == "meta" else None)
                    row = {"arch": arch, "net": net, "speedup": speedup, "method": method,
                           "achieved_speedup": report["speedup"], "seconds": time.perf_counter() - tic,
                           **{k: report[k] for k in ("flops_before", "flops_after", "params_before",
                                                     "params_after", "test_accuracy")}}
                    results["rows"].append(row)
                    save(args.name, results, table(results))
                    print(f"{arch} {net} {speedup:g}x {method}: {report['test_accuracy']['final']:.4f} "
                          f"(dense {report['test_accuracy']['dense']:.4f}) in {row['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

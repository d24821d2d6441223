# Run from the repository root:
#   python -m benchmarks.robustness                      # every available method, seeds 0 1 2, 3 epochs
#   python -m benchmarks.robustness --methods erm uniform --seeds 0 --epochs 1 --train-size 5000
#   python -m benchmarks.robustness --export-dir runs/models   # also writes runs/models/<method>.pt
"""Robustness benchmark: Fashion-MNIST, clean accuracy and accuracy under held-out corruptions.

Each method trains the shared classifier with the same budget (see :mod:`benchmarks.common`), then is
scored on the clean test set and on every corruption of :mod:`benchmarks.corruptions` at five severities
(one fixed corrupted copy of the test set per run, stored as uint8 like ImageNet-C, identical for all
methods and seeds). Reported per method, as mean ± std over seeds: clean accuracy, mean corrupted accuracy
(over corruptions and severities) and the worst corruption (lowest mean over severities).

Writes ``<results-dir>/robustness.json`` and ``<results-dir>/robustness.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import (
    Classifier,
    MethodContext,
    add_common_arguments,
    check_common_args,
    context_from_args,
    export_torchscript,
    format_table,
    pm,
    predict,
    pyplot,
    quiet_lightning,
    resolve_methods,
    run_method,
    summarize,
    write_json,
)
from benchmarks.corruptions import CORRUPTIONS, NUM_SEVERITIES, corrupt
from lightning_synth.datasets import FashionMNISTDataModule

TASK = "robustness"
CorruptedSets = dict[str, list[Tensor]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=list(CORRUPTIONS))
    parser.add_argument("--corruption-seed", type=int, default=0, help="seed of the corrupted test sets")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the train/val split and subsets")
    args = parser.parse_args(argv)
    check_common_args(args)
    return args


def to_uint8(images: Tensor) -> Tensor:
    return images.mul(255).round().clamp(0, 255).to(torch.uint8)


def build_corrupted_sets(images: Tensor, names: Sequence[str], seed: int, chunk: int = 2000) -> CorruptedSets:
    """Every corruption of ``names`` at severities 1..5, as uint8 copies of ``images``.

    Chunks get seeds ``seed + chunk_index`` so the sets do not depend on memory limits elsewhere.
    """
    sets: CorruptedSets = {}
    for name in names:
        sets[name] = [
            torch.cat([to_uint8(corrupt(part, name, severity, seed + i)) for i, part in enumerate(images.split(chunk))])
            for severity in range(1, NUM_SEVERITIES + 1)
        ]
    return sets


def evaluate(model: Classifier, images: Tensor, labels: Tensor, corrupted: CorruptedSets) -> dict[str, Any]:
    """Clean accuracy, accuracy per corruption and severity, their mean, and the worst corruption."""

    def acc(batch: Tensor) -> float:
        return float((predict(model, batch) == labels).float().mean())

    per_corruption = {name: [acc(batch) for batch in sets] for name, sets in corrupted.items()}
    means = {name: statistics.fmean(values) for name, values in per_corruption.items()}
    worst = min(means, key=means.__getitem__)
    return {
        "clean": acc(images),
        "mean_corrupted": statistics.fmean(means.values()),
        "worst_corruption": {"name": worst, "acc": means[worst]},
        "per_corruption": per_corruption,
    }


def summarize_method(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds; the worst corruption is the lowest seed-averaged one."""
    seeds = list(runs.values())
    names = list(seeds[0]["per_corruption"])
    per_corruption = {n: summarize([statistics.fmean(r["per_corruption"][n]) for r in seeds]) for n in names}
    worst = min(per_corruption, key=lambda n: per_corruption[n]["mean"])
    return {
        "clean": summarize([r["clean"] for r in seeds]),
        "mean_corrupted": summarize([r["mean_corrupted"] for r in seeds]),
        "worst_corruption": {"name": worst, **per_corruption[worst]},
        "per_corruption": per_corruption,
        "train_seconds": summarize([r["train_seconds"] for r in seeds]),
        "train_cpu_seconds": summarize([r["train_cpu_seconds"] for r in seeds]),
    }


def make_context(args: argparse.Namespace, seed: int, train_size: int, root_dir: Path) -> MethodContext:
    return context_from_args(args, TASK, seed, train_size, root_dir, in_channels=1)


def make_datamodule(args: argparse.Namespace) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        batch_size=args.batch_size,
        val_size=args.val_size,
        train_size=args.train_size,
        test_size=args.test_size,
        seed=args.data_seed,
    )


def plot(path: Path, summary: Mapping[str, Mapping[str, Any]]) -> None:
    plt = pyplot()
    methods = list(summary)
    metrics = [
        ("clean", "clean"),
        ("mean_corrupted", "mean corrupted"),
        ("worst_corruption", "worst corruption"),
    ]
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        means = [100 * summary[m][key]["mean"] for m in methods]
        stds = [100 * summary[m][key]["std"] for m in methods]
        xs = [j + (i - 1) * width for j in range(len(methods))]
        bars.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    bars.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    bars.set_ylabel("test accuracy (%)")
    bars.set_title("Fashion-MNIST: clean vs held-out corruptions")
    bars.legend(fontsize=8)
    names = list(next(iter(summary.values()))["per_corruption"])
    grid = [[100 * summary[m]["per_corruption"][n]["mean"] for n in names] for m in methods]
    image = heat.imshow(grid, cmap="viridis", aspect="auto")
    heat.set_xticks(range(len(names)), names, rotation=30, ha="right")
    heat.set_yticks(range(len(methods)), methods)
    for r, row in enumerate(grid):
        for c, value in enumerate(row):
            heat.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=7, color="w")
    heat.set_title("accuracy per corruption (mean over severities and seeds)")
    fig.colorbar(image, ax=heat)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_lightning()
    methods = resolve_methods(args.methods, TASK)
    reference = make_datamodule(args)
    reference.setup("fit")
    train_size = len(reference.train_set)  # type: ignore[arg-type]
    test_images, test_labels = reference.test_set.tensors  # type: ignore[union-attr]
    start = time.perf_counter()
    corrupted = build_corrupted_sets(test_images, args.corruptions, args.corruption_seed)
    print(
        f"corrupted test sets: {len(args.corruptions)} x {NUM_SEVERITIES} x {len(test_labels)} images "
        f"in {time.perf_counter() - start:.1f}s; training on {train_size} images"
    )
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="robustness-") as scratch:
        for method in methods:
            runs[method.name] = {}
            for seed in args.seeds:
                ctx = make_context(args, seed, train_size, Path(scratch) / f"{method.name}-{seed}")
                model, stats = run_method(method, ctx, make_datamodule(args))
                result = evaluate(model, test_images, test_labels, corrupted)
                runs[method.name][seed] = {**result, **stats, "info": ctx.info}
                print(
                    f"{method.name} seed {seed}: clean {result['clean']:.4f}, mean corrupted "
                    f"{result['mean_corrupted']:.4f}, {stats['train_seconds']:.1f}s"
                )
                if args.export_dir is not None and seed == args.seeds[0]:
                    export_torchscript(model, args.export_dir / f"{method.name}.pt")
    summary = {name: summarize_method(per_seed) for name, per_seed in runs.items()}
    rows = [
        [
            name,
            pm(s["clean"]),
            pm(s["mean_corrupted"]),
            f"{s['worst_corruption']['name']} {pm(s['worst_corruption'])}",
            f"{s['train_seconds']['mean']:.0f}",
            f"{s['train_cpu_seconds']['mean']:.0f}",
        ]
        for name, s in summary.items()
    ]
    print(format_table(["method", "clean %", "mean corrupted %", "worst corruption %", "train s", "train cpu s"], rows))
    payload = {
        "benchmark": TASK,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {
            "train_size_used": train_size,
            "test_size_used": len(test_labels),
            "max_steps": make_context(args, 0, train_size, Path()).max_steps,
        },
        "methods": {m.name: m.description for m in methods},
        "summary": summary,
        "runs": runs,
    }
    write_json(args.results_dir / f"{TASK}.json", payload)
    plot(args.results_dir / f"{TASK}.png", summary)
    return payload


if __name__ == "__main__":
    main()

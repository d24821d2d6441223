# Run from the repository root:
#   python -m benchmarks.robustness                      # every available method, seeds 0 1 2, 3 epochs
#   python -m benchmarks.robustness --methods erm uniform --seeds 0 --epochs 1 --train-size 5000
#   python -m benchmarks.robustness --export-dir runs/models   # also writes runs/models/<method>.pt
"""Robustness benchmark: Fashion-MNIST, clean accuracy and accuracy under corruptions the bank does not contain.

Protocol:

- every method trains the shared classifier with the same optimizer steps (see :mod:`benchmarks.common`);
- **validation corruptions** (``--val-corruptions``, on the validation split) are the only ones used to choose
  configurations; ``--splits val`` scores only them, so the test set stays unseen while exploring;
- **held-out test corruptions** (``--corruptions``, on the test split) are disjoint from the validation ones
  (one fixed uint8 copy per run, like ImageNet-C, identical for every method and seed);
- **leave-one-family-out** (``--lofo``): the bank methods (``--lofo-methods``, by default ``uniform`` and
  ``augmix``, and the reference) are trained
  again with a family of perturbations removed from the bank and scored on that family's closest test
  corruptions (:data:`benchmarks.corruptions.LOFO_FAMILIES`); methods that never use the bank keep their models;
- **paired differences**: per seed, ``reference - method`` for clean, mean and worst corrupted accuracy (and
  each left-out family), with the mean and 95% t-interval over seeds.

Writes ``<results-dir>/robustness.json`` (with the git commit) and ``robustness.png``, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
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
from benchmarks.corruptions import (
    CORRUPTIONS,
    LOFO_FAMILIES,
    NUM_SEVERITIES,
    TEST_CORRUPTIONS,
    VALIDATION_CORRUPTIONS,
    corrupt,
)
from lightning_synth.datasets import FashionMNISTDataModule

TASK = "robustness"
CorruptedSets = dict[str, list[Tensor]]
DEFAULT_LOFO = ("blur",)
"""Family left out by default (cost): blur, whose test analogue (zoom blur) is close; ``--lofo blur noise ...``
adds more."""
LOFO_METHODS = ("uniform", "augmix")
"""Bank baselines re-trained leave-one-family-out (with the reference); methods that never see the bank keep
their main-run models, and the other bank methods are left out of that report to keep it cheap."""
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--corruptions", nargs="+", default=list(TEST_CORRUPTIONS), choices=list(CORRUPTIONS),
                        help="held-out test corruptions (scored on the test split)")
    parser.add_argument("--val-corruptions", nargs="+", default=list(VALIDATION_CORRUPTIONS),
                        choices=list(CORRUPTIONS), help="corruptions for choosing configurations (validation split)")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"],
                        help="where to score: `val` alone while choosing configurations keeps the test set unseen")
    parser.add_argument("--lofo", nargs="*", default=list(DEFAULT_LOFO), choices=list(LOFO_FAMILIES),
                        help="leave-one-family-out: train the bank methods without each family, test on its analogue")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="train nothing: combine the runs of these results files (the same command split by "
                             "--seeds over processes) and report them as one run")
    parser.add_argument("--lofo-seeds", type=int, default=3, help="leave-one-family-out runs use the first N seeds")
    parser.add_argument("--lofo-methods", nargs="+", default=list(LOFO_METHODS), metavar="METHOD",
                        help="bank methods retrained leave-one-family-out besides the reference (e.g. add "
                             "uniform_share_sampler, the loop without targeting)")
    parser.add_argument("--reference", default="lightning_synth",
                        help="method whose paired differences to every other method are reported")
    parser.add_argument("--corruption-seed", type=int, default=0, help="seed of the corrupted test sets")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the train/val split and subsets")
    args = parser.parse_args(argv)
    check_common_args(args)
    for flag, value in (("--threads", args.threads), ("--lofo-seeds", args.lofo_seeds)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    not_bank = [m for m in args.lofo_methods if not uses_bank(m)]
    if not_bank:
        raise ValueError(f"`--lofo-methods` must name methods that train on the bank (uniform*, augmix, ls*, "
                         f"lightning*), got {not_bank}")
    overlap = set(args.corruptions) & set(args.val_corruptions)
    if overlap and {"val", "test"} <= set(args.splits):
        raise ValueError(f"`--val-corruptions` must be disjoint from `--corruptions`, both have {sorted(overlap)}")
    if "test" not in args.splits:
        args.lofo = []
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


def family_score(result: Mapping[str, Any], names: Sequence[str]) -> float:
    """Mean accuracy over ``names``' severities in a test evaluation."""
    return statistics.fmean(statistics.fmean(result["per_corruption"][n]) for n in names)


def summarize_split(seeds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of one split's scores; the worst corruption is the lowest seed-averaged one."""
    names = list(seeds[0]["per_corruption"])
    per_corruption = {n: summarize([statistics.fmean(r["per_corruption"][n]) for r in seeds]) for n in names}
    worst = min(per_corruption, key=lambda n: per_corruption[n]["mean"])
    return {
        "mean_corrupted": summarize([r["mean_corrupted"] for r in seeds]),
        "worst_corruption": {"name": worst, **per_corruption[worst]},
        "worst_corruption_per_seed": summarize([r["worst_corruption"]["acc"] for r in seeds]),
        "per_corruption": per_corruption,
    }


def summarize_method(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds: clean, each scored split, training time."""
    seeds = list(runs.values())
    out: dict[str, Any] = {"clean": summarize([r["clean"] for r in seeds])}
    for split in ("val", "test"):
        if split in seeds[0]:
            out[split] = summarize_split([r[split] for r in seeds])
    return out | {
        "train_seconds": summarize([r["train_seconds"] for r in seeds]),
        "train_cpu_seconds": summarize([r["train_cpu_seconds"] for r in seeds]),
    }


def per_seed_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers compared per seed: clean, mean / worst corrupted on each scored split, and each corruption's
    accuracy over its severities (``"{split}/{corruption}"``, :func:`family_score` of the one corruption)."""
    out = {"clean": float(result["clean"])}
    for split in ("val", "test"):
        if split in result:
            out[f"{split}_mean"] = float(result[split]["mean_corrupted"])
            out[f"{split}_worst"] = float(result[split]["worst_corruption"]["acc"])
            for name in result[split].get("per_corruption", {}):
                out[f"{split}/{name}"] = family_score(result[split], [name])
    return out


def paired(reference: Mapping[int, Mapping[str, float]], other: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """Per metric: the per-seed differences ``reference - other``, their mean and 95% t-interval."""
    seeds = sorted(set(reference) & set(other))
    out: dict[str, Any] = {}
    for metric in reference[seeds[0]] if seeds else []:
        diffs = [reference[s][metric] - other[s][metric] for s in seeds if metric in other[s]]
        if not diffs:
            continue
        mean = statistics.fmean(diffs)
        half = (T_975[min(len(diffs), len(T_975) + 1) - 2] * statistics.stdev(diffs) / len(diffs) ** 0.5
                if len(diffs) > 1 else float("nan"))
        out[metric] = {"mean": mean, "ci95": [mean - half, mean + half], "values": diffs, "seeds": seeds}
    return out


def make_context(
    args: argparse.Namespace, seed: int, train_size: int, root_dir: Path, exclude: Sequence[str] = ()
) -> MethodContext:
    extras = {"exclude_perturbations": tuple(exclude)} if exclude else None
    return context_from_args(args, TASK, seed, train_size, root_dir, in_channels=1, extras=extras)


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


def uses_bank(name: str) -> bool:
    """Whether a method trains on the perturbation bank (every ``uniform*``, ``ls*`` and ``lightning*`` variant,
    AugMix): in the leave-one-family-out report it is either retrained without the family or left out, never
    scored with its main model (trained on the family)."""
    return name in LOFO_METHODS or name.startswith(("uniform", "targeted_augmix", "ls", "lightning"))


def lofo_retrained(name: str, reference: str, baselines: Sequence[str] = LOFO_METHODS) -> bool:
    """Whether the leave-one-family-out report retrains ``name`` without the family (the bank ``baselines`` and
    the reference); other bank methods have no entry there."""
    return name in (*baselines, reference)


def fmt_diff(stats: Mapping[str, Any]) -> str:
    low, high = stats["ci95"]
    return f"{100 * stats['mean']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def train_and_score(
    args: argparse.Namespace, methods: Sequence[Any], train_size: int,
    splits: Mapping[str, tuple[Tensor, Tensor, CorruptedSets]], score: Any,
) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, dict[str, dict[int, float]]]]:
    """Train every method on every seed (then the leave-one-family-out runs) and score them."""
    lofo: dict[str, dict[str, dict[int, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="robustness-") as scratch:
        runs: dict[str, dict[int, dict[str, Any]]] = {method.name: {} for method in methods}
        for seed in args.seeds:  # seeds outside: a cut-short run still has every method on its first seeds
            for method in methods:
                ctx = make_context(args, seed, train_size, Path(scratch) / f"{method.name}-{seed}")
                model, stats = run_method(method, ctx, make_datamodule(args))
                result = score(model)
                runs[method.name][seed] = {**result, **stats, "info": ctx.info}
                parts = [f"{k} mean {result[k]['mean_corrupted']:.4f} worst {result[k]['worst_corruption']['acc']:.4f}"
                         for k in splits]
                print(f"{method.name} seed {seed}: clean {result['clean']:.4f}, {'; '.join(parts)}, "
                      f"{stats['train_seconds']:.1f}s ({stats['train_cpu_seconds']:.1f} cpu s)", flush=True)
                if args.export_dir is not None and seed == args.seeds[0]:
                    export_torchscript(model, args.export_dir / f"{method.name}.pt")
        # Leave-one-family-out: bank methods retrain without the family; the others keep their main-run models.
        for family in args.lofo:
            removed, analogues = LOFO_FAMILIES[family]
            lofo[family] = {}
            for method in methods:
                if not uses_bank(method.name):
                    lofo[family][method.name] = {
                        s: family_score(r["test"], analogues) for s, r in runs[method.name].items()
                        if s in args.seeds[: args.lofo_seeds]}
                    continue
                if not lofo_retrained(method.name, args.reference, args.lofo_methods):
                    continue
                lofo[family][method.name] = {}
                for seed in args.seeds[: args.lofo_seeds]:
                    ctx = make_context(args, seed, train_size, Path(scratch) / f"lofo-{family}-{method.name}-{seed}",
                                       exclude=removed)
                    model, _ = run_method(method, ctx, make_datamodule(args))
                    images, labels, corrupted = splits["test"]
                    result = evaluate(model, images, labels, {n: corrupted[n] for n in analogues})
                    lofo[family][method.name][seed] = family_score(result, analogues)
                    print(f"lofo {family} {method.name} seed {seed}: {lofo[family][method.name][seed]:.4f}", flush=True)
    return runs, lofo


def merge_parts(paths: Sequence[Path], names: Sequence[str], lofo_seeds: Sequence[int] | None = None,
                reference: str = "lightning_synth", baselines: Sequence[str] = LOFO_METHODS,
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The per-seed runs and leave-one-family-out scores of several results files, as one run (the latter on
    ``lofo_seeds`` only, when given: a part run with the leave-one-family-out default on a later seed adds none).
    A bank method's leave-one-family-out entry is kept only if both this merge and the part retrain it (the
    part's ``--lofo-methods`` and reference, read from its config; parts from before that option retrained
    ``uniform``, ``augmix`` and the reference): entries that older parts scored with a main model, which was
    trained on the family, are dropped."""
    runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in names}
    lofo: dict[str, dict[str, dict[int, float]]] = {}
    for path in paths:
        part = json.loads(Path(path).read_text())
        config = part.get("config", {})
        part_reference, part_baselines = config.get("reference", reference), config.get("lofo_methods", LOFO_METHODS)
        for name, per_seed in part["runs"].items():
            if name in runs:
                runs[name].update({int(seed): result for seed, result in per_seed.items()})
        for family, per_method in part.get("lofo", {}).items():
            for name, stats in per_method.items():
                if name not in runs:  # a method this merge does not list (its main runs are left out too)
                    continue
                if uses_bank(name) and not (lofo_retrained(name, reference, baselines)
                                            and lofo_retrained(name, part_reference, part_baselines)):
                    continue
                lofo.setdefault(family, {}).setdefault(name, {}).update(
                    {int(seed): value for seed, value in stats["per_seed"].items()
                     if lofo_seeds is None or int(seed) in lofo_seeds})
    missing = [name for name, per_seed in runs.items() if not per_seed]
    if missing:
        raise ValueError(f"`--merge`: no runs of {missing} in {[str(p) for p in paths]}")
    return {n: dict(sorted(r.items())) for n, r in runs.items()}, lofo


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    methods = resolve_methods(args.methods, TASK)
    reference = make_datamodule(args)
    reference.setup("fit")
    train_size = len(reference.train_set)  # type: ignore[arg-type]
    splits: dict[str, tuple[Tensor, Tensor, CorruptedSets]] = {}
    start = time.perf_counter()
    if "val" in args.splits:
        images, labels = reference.val_set.tensors  # type: ignore[union-attr]
        splits["val"] = (images, labels, build_corrupted_sets(images, args.val_corruptions, args.corruption_seed))
    if "test" in args.splits:
        images, labels = reference.test_set.tensors  # type: ignore[union-attr]
        splits["test"] = (images, labels, build_corrupted_sets(images, args.corruptions, args.corruption_seed))
    print(f"corrupted sets ({', '.join(f'{k}: {len(v[1])} images' for k, v in splits.items())}) in "
          f"{time.perf_counter() - start:.1f}s; training on {train_size} images")
    clean_split = "test" if "test" in splits else "val"

    def score(model: Classifier) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split, (images, labels, corrupted) in splits.items():
            out[split] = evaluate(model, images, labels, corrupted)
        out["clean"] = out[clean_split]["clean"]
        return out

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    lofo: dict[str, dict[str, dict[int, float]]] = {}
    if args.merge:
        runs, lofo = merge_parts(args.merge, [m.name for m in methods], args.seeds[: args.lofo_seeds],
                                 args.reference, args.lofo_methods)
    else:
        runs, lofo = train_and_score(args, methods, train_size, splits, score)
    summary = {name: summarize_method(per_seed) for name, per_seed in runs.items()}
    metrics = {name: {s: per_seed_metrics(r) for s, r in per_seed.items()} for name, per_seed in runs.items()}
    differences: dict[str, Any] = {}
    if args.reference in runs:
        differences = {name: paired(metrics[args.reference], metrics[name]) for name in runs if name != args.reference}
        for family, per_method in lofo.items():
            for name in per_method:
                if name != args.reference and args.reference in per_method:
                    ref = {s: {family: v} for s, v in per_method[args.reference].items()}
                    oth = {s: {family: v} for s, v in per_method[name].items()}
                    differences[name].setdefault("lofo", {}).update(paired(ref, oth))
    headers = ["method", "clean %"]
    for split in splits:
        headers += [f"{split} mean corr. %", f"{split} worst corr. %"]
    rows = []
    for name, s in summary.items():
        row = [name, pm(s["clean"])]
        for split in splits:
            row += [pm(s[split]["mean_corrupted"]),
                    f"{s[split]['worst_corruption']['name']} {pm(s[split]['worst_corruption'])}"]
        rows.append([*row, f"{s['train_seconds']['mean']:.0f}"])
    print(format_table([*headers, "train s"], rows))
    if differences:
        keys = ["clean"] + [f"{split}_{m}" for split in splits for m in ("mean", "worst")]
        print(f"\npaired difference {args.reference} - method, points, mean [95% t-interval over seeds]")
        print(format_table(["method", *keys], [[n, *(fmt_diff(d[k]) if k in d else "-" for k in keys)]
                                               for n, d in differences.items()]))
        for split in splits:
            names = [k for k in next(iter(differences.values()), {}) if k.startswith(f"{split}/")]
            if names:
                print(f"\nper corruption ({split}, mean over severities): {args.reference} - method, points")
                print(format_table(["method", *(k.split("/", 1)[1] for k in names)],
                                   [[n, *(fmt_diff(d[k]) if k in d else "-" for k in names)]
                                    for n, d in differences.items()]))
    if lofo:
        families = list(lofo)
        print("\nleave-one-family-out: accuracy % on the family's test analogues, bank trained without the family")
        lrows = []
        for name in [n for n in runs if any(n in lofo[f] for f in families)]:  # each family may list others
            row = [name]
            for family in families:
                values = list(lofo[family].get(name, {}).values())
                row.append(pm(summarize(values)) if values else "-")
                diff = differences.get(name, {}).get("lofo", {}).get(family)
                row.append(fmt_diff(diff) if diff else "-")
            lrows.append(row)
        print(format_table(["method", *(f"{f} {k}" for f in families for k in ("acc %", "diff"))], lrows))
    payload = {
        "benchmark": TASK,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {
            "train_size_used": train_size,
            "val_size_used": len(splits["val"][1]) if "val" in splits else None,
            "test_size_used": len(splits["test"][1]) if "test" in splits else None,
            "max_steps": make_context(args, 0, train_size, Path()).max_steps,
            "lofo_families": {f: {"removed": LOFO_FAMILIES[f][0], "tested_on": LOFO_FAMILIES[f][1]} for f in lofo},
        },
        "methods": {m.name: m.description for m in methods},
        "summary": summary,
        "paired_differences": {"reference": args.reference, "ci": "95% t-interval over seeds", "vs": differences},
        "lofo": {f: {m: summarize(list(v.values())) | {"per_seed": v} for m, v in per.items()}
                 for f, per in lofo.items()},
        "runs": runs,
    }
    if args.merge:  # later parts replace earlier ones per (method, seed): say which commit each came from
        parts = {str(p): json.loads(Path(p).read_text()) for p in args.merge}
        payload["merged_parts"] = {p: {"commit": part.get("commit"), "tree_clean": part.get("tree_clean"),
                                       "methods": sorted(part["runs"])} for p, part in parts.items()}
    write_json(args.results_dir / f"{TASK}.json", payload)
    if "test" in splits:
        plot(args.results_dir / f"{TASK}.png", {n: s | s["test"] for n, s in summary.items()})
    return payload


if __name__ == "__main__":
    main()

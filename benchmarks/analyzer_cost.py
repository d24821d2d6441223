# python -m benchmarks.analyzer_cost
# (from the repository root; ~5 min on 2 shared cores)
"""What FailureModeCallback costs, and how its cheaper probing agrees with a full sweep.

Fashion-MNIST, :class:`~lightning_synth.demos.ImageClassifier` (``arch="cnn"``), CPU. A model is trained for
``--checkpoints`` epochs (one ``fit`` of one epoch each, in train mode); after each epoch (a checkpoint) three
validations run on the same weights, in turn:

- ``none``: ``trainer.validate`` without the analyzer (the baseline);
- ``full``: ``FailureModeCallback(full_sweep_every=1, sequential=False)``: every perturbation x severity on
  ``max_samples`` samples (9 x 5 x 256 = 11,520 extra forwards), the reference profile;
- ``cheap``: ``FailureModeCallback()`` at its defaults (sequential stopping, severities around the last
  frontier and the leading third of the cells, a full sweep every 5 analyses), one instance carried across the
  checkpoints as during training.

Reported per checkpoint and as medians: wall seconds, probe forwards, the ratio to ``none``, and the agreement
of ``cheap`` with ``full`` on the same weights: Spearman rank correlation of the gaps of ``full``'s top-20
weaknesses (all kinds) and the largest frontier difference over perturbations (a frontier never reached counts
as the top severity). Both analyzers use the same probe seed, so a cell probed on all samples is identical.
``--threads 1`` (default): on a small shared CPU one thread is faster and steadier than torch's default.

Writes ``<results-dir>/analyzer_cost.json``, the cheap profile's heatmap at the last checkpoint
(``analyzer_cost.png``) and its frontier chart over the checkpoints (``analyzer_cost.frontier.png``), and prints
a table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import RESULTS_DIR, format_table, machine_info, quiet_lightning, write_json
from lightning_synth.callbacks.failure_mode import FailureModeCallback
from lightning_synth.datasets import FashionMNISTDataModule
from lightning_synth.demos import ImageClassifier
from lightning_synth.profile import WeaknessProfile
from lightning_synth.report import render_frontier_chart, render_heatmap

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"full_sweep_every": 1, "sequential": False, "ladder_search": False},
    "cheap": {},
}
TOP_K = 20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-size", type=int, default=2000, help="validation samples")
    parser.add_argument("--train-size", type=int, default=10000, help="training samples")
    parser.add_argument("--checkpoints", type=int, default=4, help="training epochs, one checkpoint after each")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 is faster and steadier on a shared box")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not 0 < args.val_size < 60000:
        raise ValueError(f"`--val-size` must be in (0, 60000), got {args.val_size}")
    for flag, value in (("--train-size", args.train_size), ("--checkpoints", args.checkpoints),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    if args.threads < 0:
        raise ValueError(f"`--threads` must be >= 0, got {args.threads}")
    return args


def make_trainer(root: str, callbacks: Sequence[Any], **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=root, callbacks=list(callbacks),
        **kwargs,
    )


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties).

    Example:
        >>> spearman([1, 2, 3], [10, 20, 30]), spearman([1, 2, 3], [3, 2, 1])
        (1.0, -1.0)
    """
    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 1.0


def agreement(cheap: WeaknessProfile, full: WeaknessProfile, top_severity: float) -> dict[str, Any]:
    """Top-20 rank correlation of gaps (``full``'s top 20) and the largest frontier difference."""
    keys = [w.key for w in full.weaknesses[:TOP_K]]
    gaps = {w.key: w.gap for w in cheap.weaknesses}
    missing = [k for k in keys if k not in gaps]
    rho = spearman([full.get(k).gap for k in keys], [gaps.get(k, -1.0) for k in keys])
    diffs = {n: abs((cheap.frontier.get(n) or top_severity) - (f if f is not None else top_severity))
             for n, f in full.frontier.items()}
    worst = max(diffs, key=lambda n: diffs[n])
    return {"top20_spearman": rho, "max_frontier_diff": diffs[worst], "max_frontier_diff_at": worst,
            "frontier_diffs": diffs, "missing_in_cheap": missing}


def run_validate(model: ImageClassifier, dm: FashionMNISTDataModule, root: str,
                 cb: FailureModeCallback | None) -> tuple[float, int]:
    before = cb.probe_forwards if cb is not None else 0
    trainer = make_trainer(root, [cb] if cb is not None else [])
    start = time.perf_counter()
    trainer.validate(model, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - start
    if cb is not None and cb.profile is None:
        raise RuntimeError("FailureModeCallback built no profile: the timing is not valid")
    return seconds, (cb.probe_forwards - before if cb is not None else 0)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_lightning()
    L.seed_everything(args.seed, verbose=False)
    machine = machine_info()  # before --threads, so it records torch's own default
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "benchmarks.analyzer_cost", *(sys.argv[1:] if argv is None else argv)])
    dm = FashionMNISTDataModule(batch_size=args.batch_size, val_size=args.val_size, train_size=args.train_size,
                                seed=args.seed)
    dm.setup()
    model = ImageClassifier(num_classes=10, in_channels=1, image_size=28, arch="cnn")
    load_start, wall_start = os.getloadavg(), time.perf_counter()
    cheap = FailureModeCallback(pictures=False, **VARIANTS["cheap"])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        run_validate(model, dm, root, FailureModeCallback(max_samples=16, pictures=False))  # warm-up, untimed
        for epoch in range(args.checkpoints):
            model.train()  # Lightning keeps a module's mode: a model left in eval mode would train so (BatchNorm)
            make_trainer(root, [], max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm)
            row: dict[str, Any] = {"checkpoint": epoch}
            full = FailureModeCallback(pictures=False, **VARIANTS["full"])
            for name, cb in (("none", None), ("full", full), ("cheap", cheap)):
                seconds, forwards = run_validate(model, dm, root, cb)
                row[name] = {"seconds": seconds, "probe_forwards": forwards}
            assert full.profile is not None and cheap.profile is not None
            row["agreement"] = agreement(cheap.profile, full.profile, float(max(full.severities)))
            rows.append(row)
            print(f"  checkpoint {epoch}: none {row['none']['seconds']:.2f} s, full {row['full']['seconds']:.2f} s "
                  f"({row['full']['probe_forwards']} fwd), cheap {row['cheap']['seconds']:.2f} s "
                  f"({row['cheap']['probe_forwards']} fwd), top-20 rho {row['agreement']['top20_spearman']:.3f}, "
                  f"max frontier diff {row['agreement']['max_frontier_diff']:.2f} "
                  f"({row['agreement']['max_frontier_diff_at']})", flush=True)
    summary = summarize(rows)
    print()
    print(table(summary))
    payload = {
        "benchmark": "analyzer_cost",
        "command": command,
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "total_wall_s": time.perf_counter() - wall_start,
        "config": {"dataset": "fashion-mnist", "model": "ImageClassifier(arch='cnn', width=32)",
                   "accelerator": "cpu", "val_size": args.val_size, "train_size": args.train_size,
                   "checkpoints": args.checkpoints, "batch_size": args.batch_size, "seed": args.seed,
                   "threads": torch.get_num_threads(), "variants": VARIANTS, "top_k": TOP_K},
        "checkpoints": rows,
        "summary": summary,
    }
    path = write_json(args.results_dir / "analyzer_cost.json", payload)
    # The pictures the analyzer draws, for the cheap profile at the last checkpoint and its history.
    heatmap = render_heatmap(cheap.history[-1], args.results_dir / "analyzer_cost.png", list(cheap.severities))
    frontier = render_frontier_chart(
        [p.model_copy(update={"epoch": i}) for i, p in enumerate(cheap.history)],
        args.results_dir / "analyzer_cost.frontier.png")
    print(f"\nwrote {path}\nwrote {heatmap}\nwrote {frontier}")
    return payload


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    base = statistics.median(r["none"]["seconds"] for r in rows)
    out: dict[str, Any] = {}
    for name in ("none", "full", "cheap"):
        seconds = statistics.median(r[name]["seconds"] for r in rows)
        out[name] = {"median_s": seconds, "ratio_to_none": seconds / base, "added_s": seconds - base,
                     "total_probe_forwards": sum(r[name]["probe_forwards"] for r in rows)}
    out["cheap"]["forward_share_of_full"] = out["cheap"]["total_probe_forwards"] / max(
        out["full"]["total_probe_forwards"], 1)
    out["cheap"]["added_share_of_full"] = out["cheap"]["added_s"] / out["full"]["added_s"] if out["full"][
        "added_s"] > 0 else None
    rhos = [r["agreement"]["top20_spearman"] for r in rows]
    diffs = [r["agreement"]["max_frontier_diff"] for r in rows]
    out["agreement"] = {"top20_spearman_min": min(rhos), "top20_spearman_median": statistics.median(rhos),
                        "max_frontier_diff_max": max(diffs), "max_frontier_diff_median": statistics.median(diffs)}
    return out


def table(summary: dict[str, Any]) -> str:
    rows = [[name, f"{s['median_s']:.2f}", f"{s['added_s']:+.2f}", f"{s['ratio_to_none']:.2f}x",
             str(s["total_probe_forwards"])] for name, s in summary.items() if name != "agreement"]
    a = summary["agreement"]
    text = format_table(["analyzer", "median s", "added s", "ratio", "probe forwards (all checkpoints)"], rows)
    return (text + f"\nagreement cheap vs full: top-20 Spearman min {a['top20_spearman_min']:.3f} "
            f"(median {a['top20_spearman_median']:.3f}), largest frontier difference {a['max_frontier_diff_max']:.2f}"
            f" (median {a['max_frontier_diff_median']:.2f})")


if __name__ == "__main__":
    main()

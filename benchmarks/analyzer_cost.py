# python -m benchmarks.analyzer_cost
# (from the repository root; ~6 min on 2 shared cores; e.g. --repeats 5 --fit-settings default cheap)
"""What FailureModeCallback costs: validation and fit wall time with vs without it, side by side in one run.

Fashion-MNIST, :class:`~lightning_synth.demos.ImageClassifier` (``arch="cnn"``), CPU. Each repeat times, in
turn, ``trainer.validate`` with no callback and then with the analyzer at each setting (so drift on a shared
machine hits every variant alike), and likewise one training epoch plus its end-of-epoch validation
(``trainer.fit``, ``max_epochs=1``, every variant from the same initial weights): the overhead a user feels.
Reported per variant: the median wall time, the ratio of medians to the no-callback run, the median of the
per-repeat (paired) ratios and the seconds the analyzer adds. An untimed warm-up runs first.

Analyzer settings: ``default`` is ``FailureModeCallback()`` (max_samples=256, all 9 perturbations x 5
severities = 11,520 extra forwards); ``large`` is max_samples=512 (23,040); ``cheap`` is max_samples=256,
severities 1, 3, 5 (6,912). Validation
is timed with every setting, fit with ``--fit-settings`` (default: ``default`` only, to keep the run short).
The analyzer's cost is fixed by ``max_samples`` while validation's grows with ``--val-size``, so the ratio
falls as the validation set grows. ``--threads 1`` (default) because on a small shared CPU one thread is
faster and steadier than torch's default; pass ``--threads 0`` for torch's own choice.

Writes ``<results-dir>/analyzer_cost.json`` (machine info, the command, all timings) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import RESULTS_DIR, format_table, machine_info, quiet_lightning, write_json
from lightning_synth.callbacks.failure_mode import FailureModeCallback
from lightning_synth.datasets import FashionMNISTDataModule
from lightning_synth.demos import ImageClassifier

BASELINE = "none"
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "large": {"max_samples": 512},
    "cheap": {"max_samples": 256, "severities": [1, 3, 5]},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-size", type=int, default=5000, help="validation samples")
    parser.add_argument("--train-size", type=int, default=10000, help="training samples of the fit measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of every variant")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--fit-settings", nargs="*", default=["default"], choices=list(SETTINGS),
                        help="analyzer settings of the fit measurement (none: skip it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 is faster and steadier on a shared box")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not 0 < args.val_size < 60000:
        raise ValueError(f"`--val-size` must be in (0, 60000), got {args.val_size}")
    for flag, value in (("--train-size", args.train_size), ("--repeats", args.repeats),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    for flag, names in (("--settings", args.settings), ("--fit-settings", args.fit_settings)):
        if len(set(names)) != len(names):
            raise ValueError(f"`{flag}` must not repeat a name, got {names}")
    if args.threads < 0:
        raise ValueError(f"`--threads` must be >= 0, got {args.threads}")
    return args


def make_callbacks(setting: str) -> list[FailureModeCallback]:
    return [] if setting == BASELINE else [FailureModeCallback(**SETTINGS[setting])]


def make_trainer(root: str, callbacks: Sequence[Callback], **kwargs: Any) -> L.Trainer:
    callbacks = list[Callback](callbacks)
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks, **kwargs,
    )


def check_profiled(callbacks: list[FailureModeCallback], what: str) -> None:
    # A silently inactive analyzer would make a ratio of 1.0 look like a result.
    for cb in callbacks:
        if cb.profile is None:
            raise RuntimeError(f"FailureModeCallback built no profile during {what}: the timing is not valid")


def time_validate(model: ImageClassifier, dm: FashionMNISTDataModule, setting: str, root: str,
                  **kwargs: Any) -> float:
    callbacks = make_callbacks(setting)
    trainer = make_trainer(root, callbacks, **kwargs)
    start = time.perf_counter()
    trainer.validate(model, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - start
    check_profiled(callbacks, "validate")
    return seconds


def time_fit(init: ImageClassifier, dm: FashionMNISTDataModule, setting: str, root: str,
             **kwargs: Any) -> tuple[float, ImageClassifier]:
    model = copy.deepcopy(init)
    callbacks = make_callbacks(setting)
    trainer = make_trainer(root, callbacks, max_epochs=1, **kwargs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    check_profiled(callbacks, "fit")
    return seconds, model


def warm_up(init: ImageClassifier, dm: FashionMNISTDataModule, root: str) -> None:
    """Untimed: first-call costs (allocator, kernels of every perturbation) would otherwise land on repeat 1."""
    print("warm-up (untimed)", flush=True)
    cb = FailureModeCallback(max_samples=16)
    trainer = make_trainer(root, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(copy.deepcopy(init), datamodule=dm)
    check_profiled([cb], "warm-up")


def interleaved(variants: Sequence[str], repeats: int, run: Callable[[str], float]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        for variant in variants:
            times[variant].append(run(variant))
            print(f"  repeat {r + 1}/{repeats} {variant:<8} {times[variant][-1]:7.2f} s", flush=True)
    return times


def summarize_phase(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    base = times[BASELINE]
    base_median = statistics.median(base)
    out = {}
    for variant, values in times.items():
        median = statistics.median(values)
        paired = [v / b for v, b in zip(values, base, strict=True)]
        out[variant] = {
            "settings": None if variant == BASELINE else describe(variant),
            "seconds": values,
            "median_s": median,
            "ratio_of_medians": median / base_median,
            "paired_ratios": paired,
            "median_paired_ratio": statistics.median(paired),
            "added_s": median - base_median,
        }
    return out


def describe(setting: str) -> dict[str, Any]:
    cb = FailureModeCallback(**SETTINGS[setting])
    forwards = cb.max_samples * len(cb.bank) * len(cb.severities)
    return {"max_samples": cb.max_samples, "perturbations": len(cb.bank), "severities": list(cb.severities),
            "extra_forwards": forwards}


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = []
    for phase, variants in results.items():
        for variant, r in variants.items():
            s = r["settings"]
            probes = "-" if s is None else f"{s['max_samples']}x{s['perturbations']}x{len(s['severities'])}"
            rows.append([phase, variant, probes, f"{r['median_s']:.2f}", f"{r['added_s']:+.2f}",
                         f"{r['ratio_of_medians']:.2f}x", f"{r['median_paired_ratio']:.2f}x"])
    headers = ["phase", "analyzer", "samples x perts x sevs", "median s", "added s", "ratio", "paired ratio"]
    return format_table(headers, rows)


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
    init = ImageClassifier(num_classes=10, in_channels=1, image_size=28, arch="cnn")
    load_start = os.getloadavg()
    wall_start = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as root:
        warm_up(init, dm, root)
        model = init
        if args.fit_settings:
            print(f"fit: 1 epoch on {args.train_size} train samples + validation on {args.val_size}", flush=True)
            trained: dict[str, ImageClassifier] = {}

            def run_fit(variant: str) -> float:
                seconds, trained[variant] = time_fit(init, dm, variant, root)
                return seconds

            fit_times = interleaved([BASELINE, *args.fit_settings], args.repeats, run_fit)
            results["fit+val"] = summarize_phase(fit_times)
            model = trained[BASELINE]  # a trained model makes the validation profile meaningful (cost is the same)
        print(f"validate: {args.val_size} samples", flush=True)
        val_times = interleaved([BASELINE, *args.settings], args.repeats, lambda v: time_validate(model, dm, v, root))
        results = {"validate": summarize_phase(val_times), **results}
    print()
    print(table(results))
    payload = {
        "benchmark": "analyzer_cost",
        "command": command,
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "total_wall_s": time.perf_counter() - wall_start,
        "config": {"dataset": "fashion-mnist", "model": "ImageClassifier(arch='cnn', width=32)",
                   "accelerator": "cpu", "val_size": args.val_size, "train_size": args.train_size,
                   "batch_size": args.batch_size, "repeats": args.repeats, "seed": args.seed,
                   "threads": torch.get_num_threads(), "fit_settings": args.fit_settings,
                   "settings": {name: SETTINGS[name] for name in SETTINGS}},
        "results": results,
    }
    path = write_json(args.results_dir / "analyzer_cost.json", payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()

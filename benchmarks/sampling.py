# Run:   python benchmarks/sampling.py        (20k-sample subset, 3 epochs, 2 seeds: ~8 min on 2 busy CPU cores)
# Quick: python benchmarks/sampling.py --epochs 2 --train-size 4000 --seeds 0 --out /tmp/sampling.json
"""Uniform vs adaptive vs reducible-loss sampling on Fashion-MNIST with a small CNN, side by side in one run.

For each seed both runs start from the same weights, see the same number of steps and, in the first epoch,
the same batches: the uniform baseline reshuffles each epoch exactly as the adaptive sampler draws while all
weights are still equal, so the curves part only when adaptive weights first apply (epoch 2). Reported: steps
to reach each target test accuracy (probed every ``--eval-every`` steps on a fixed test subset, mean of the
last ``--smooth`` probes), final accuracy (that subset and the full 10k test set), training wall time without
the probes, the wall-time ratio adaptive / uniform, and the time spent inside the callback's hooks and the
sampler's draws. ``reducible`` is ``adaptive`` scoring loss minus an irreducible loss (RHO-LOSS): its
:class:`~lightning_synth.irreducible.IrreducibleLoss` model trains on ``--holdout-size`` training images outside
the subset, at fit start (counted in its callback time). Writes ``benchmarks/results/sampling.json`` and prints a
table. Wall times on a shared machine are noisy; the in-callback share is the steadier overhead figure.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from benchmarks.common import write_json
from lightning_synth.callbacks.adaptive_sampling import AdaptiveSampling
from lightning_synth.data.sampler import systematic_draw
from lightning_synth.datasets import load_fashion_mnist
from lightning_synth.irreducible import IrreducibleLoss

RESULTS = Path(__file__).resolve().parent / "results" / "sampling.json"


class SmallCNN(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@torch.no_grad()
def accuracy(model: SmallCNN, images: Tensor, labels: Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model.net(x).argmax(1) == y).sum()) for x, y in zip(images.split(1000), labels.split(1000)))
    model.train(was_training)
    return correct / len(labels)


class SeededShuffle(Sampler[int]):
    """A new permutation each epoch, drawn exactly as AdaptiveSampler draws while its weights are uniform."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        uniform = torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        return iter(systematic_draw(uniform, self.n, torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


class AccuracyProbe(Callback):
    """Test accuracy every ``every`` optimizer steps; keeps its own time so it can be subtracted."""

    def __init__(self, images: Tensor, labels: Tensor, every: int) -> None:
        self.images, self.labels, self.every = images, labels, every
        self.curve: list[tuple[int, float]] = []
        self.seconds = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            start = time.perf_counter()
            self.curve.append((trainer.global_step, accuracy(pl_module, self.images, self.labels)))  # type: ignore[arg-type]
            self.seconds += time.perf_counter() - start


class TimedAdaptiveSampling(AdaptiveSampling):
    """AdaptiveSampling that adds up the wall time spent in its per-step and per-epoch hooks."""

    seconds = 0.0

    def _timed(name: str):  # type: ignore[misc]
        def hook(self: TimedAdaptiveSampling, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return getattr(AdaptiveSampling, name)(self, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return hook

    on_train_start = _timed("on_train_start")
    on_train_batch_start = _timed("on_train_batch_start")
    on_train_batch_end = _timed("on_train_batch_end")
    on_train_epoch_start = _timed("on_train_epoch_start")
    on_train_epoch_end = _timed("on_train_epoch_end")
    _capture = _timed("_capture")


def steps_to(curve: list[tuple[int, float]], target: float, smooth: int) -> int | None:
    """First step at which the mean of the last ``smooth`` probes reaches ``target`` (one probe is noisy)."""
    accs = [acc for _, acc in curve]
    for k, (step, _) in enumerate(curve):
        window = accs[max(0, k - smooth + 1) : k + 1]
        if sum(window) / len(window) >= target:
            return step
    return None


def run(method: str, seed: int, data: dict[str, Tensor], args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model = SmallCNN(args.lr)
    train = TensorDataset(data["train_x"], data["train_y"])
    sampler = SeededShuffle(len(train), seed) if method == "uniform" else None
    # otherwise a plain shuffling loader: the callback installs its sampler
    datamodule = L.LightningDataModule.from_datasets(
        train_dataset=train, val_dataset=TensorDataset(data["holdout_x"], data["holdout_y"]),
        batch_size=args.batch_size,
    )
    datamodule.train_dataloader = lambda: DataLoader(  # type: ignore[method-assign]
        train, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None
    )
    probe = AccuracyProbe(data["probe_x"], data["probe_y"], args.eval_every)
    callbacks: list[Callback] = [probe]
    sampling = None
    if method != "uniform":
        irreducible = IrreducibleLoss(seed=seed) if method == "reducible" else None
        sampling = TimedAdaptiveSampling(temperature=args.temperature, uniform_mix=args.uniform_mix, log_stats=False,
                                         irreducible=irreducible)
        callbacks.append(sampling)
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir="/tmp/lightning_synth_bench",
        limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    result: dict[str, Any] = {
        "steps": trainer.global_step,
        "train_seconds": wall - probe.seconds,
        "curve": probe.curve,
        "final_acc_probe": accuracy(model, data["probe_x"], data["probe_y"]),
        "final_acc_test10k": accuracy(model, data["test_x"], data["test_y"]),
        "steps_to": {f"{t:.2f}": steps_to(probe.curve, t, args.smooth) for t in args.targets},
    }
    if sampling is not None and sampling.sampler is not None:
        start = time.perf_counter()
        list(sampling.sampler)  # one epoch's draw, which happens inside the DataLoader iterator
        draw = time.perf_counter() - start
        result.update(callback_seconds=sampling.seconds + draw * args.epochs, sampler_stats=sampling.sampler.stats())
    return result


def summarize(runs: dict[str, list[dict[str, Any]]], targets: list[float]) -> dict[str, Any]:
    """Means over seeds; steps to a target average the seeds that reached it, and say how many did."""
    summary: dict[str, Any] = {}
    for method, results in runs.items():
        row: dict[str, Any] = {
            key: statistics.mean(r[key] for r in results)
            for key in ("final_acc_probe", "final_acc_test10k", "train_seconds")
        }
        row["mean_of_last_5_probes"] = statistics.mean(statistics.mean(a for _, a in r["curve"][-5:]) for r in results)
        for t in targets:
            reached = [s for r in results if (s := r["steps_to"][f"{t:.2f}"]) is not None]
            row[f"steps_to_{t:.2f}"] = statistics.mean(reached) if reached else None
            row[f"seeds_reaching_{t:.2f}"] = f"{len(reached)}/{len(results)}"
        summary[method] = row
    for method in runs:
        if method == "uniform":
            continue
        summary[f"overhead_{method}"] = {
            "wall_time_ratio": summary[method]["train_seconds"] / summary["uniform"]["train_seconds"],
            "callback_share_of_train_time": statistics.mean(
                r["callback_seconds"] / r["train_seconds"] for r in runs[method]
            ),
        }
        # per seed and target: wherever uniform got there, this method got there too, in no more steps
        summary[f"{method}_not_slower_to_targets"] = all(
            u is None or (a is not None and a <= u)
            for ra, ru in zip(runs[method], runs["uniform"], strict=True)
            for a, u in zip(ra["steps_to"].values(), ru["steps_to"].values(), strict=True)
        )
    return summary


def print_table(summary: dict[str, Any], targets: list[float], methods: list[str]) -> None:
    header = ["method", *[f"steps→{t:.2f}" for t in targets], "final acc probe/10k", "last-5 probes", "train s"]
    print(" | ".join(f"{h:>19}" for h in header))
    for method in methods:
        row = summary[method]
        cells = [method]
        for t in targets:
            steps = row[f"steps_to_{t:.2f}"]
            cells.append("—" if steps is None else f"{steps:g} ({row[f'seeds_reaching_{t:.2f}']} seeds)")
        cells += [
            f"{row['final_acc_probe']:.4f} / {row['final_acc_test10k']:.4f}",
            f"{row['mean_of_last_5_probes']:.4f}",
            f"{row['train_seconds']:.1f}",
        ]
        print(" | ".join(f"{c:>19}" for c in cells))
    for method in methods[1:]:
        overhead = summary[f"overhead_{method}"]
        print(
            f"{method}: wall-time ratio to uniform {overhead['wall_time_ratio']:.3f}; time inside the callback and "
            f"draws: {100 * overhead['callback_share_of_train_time']:.2f}% of its training time; not slower to any "
            f"target on any seed: {summary[f'{method}_not_slower_to_targets']}"
        )


def warm_up(data: dict[str, Tensor], args: argparse.Namespace) -> None:
    """A few untimed steps of each method, so one-off start-up costs do not land on the first timed run."""
    quick = argparse.Namespace(**{**vars(args), "epochs": 1, "eval_every": 10**9})
    small = {
        **data,
        "train_x": data["train_x"][: 4 * args.batch_size],
        "train_y": data["train_y"][: 4 * args.batch_size],
    }
    for method in args.methods:
        run(method, 0, small, quick)


def load_data(args: argparse.Namespace) -> dict[str, Tensor]:
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    shuffled = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1234))
    order, holdout = shuffled[: args.train_size], shuffled[args.train_size : args.train_size + args.holdout_size]
    probe = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(4321))[: args.test_size]
    return {
        "train_x": train_x[order], "train_y": train_y[order], "probe_x": test_x[probe], "probe_y": test_y[probe],
        "test_x": test_x, "test_y": test_y, "holdout_x": train_x[holdout], "holdout_y": train_y[holdout],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=20_000)
    parser.add_argument("--test-size", type=int, default=2_000, help="fixed test subset probed during training")
    parser.add_argument("--eval-every", type=int, default=20, help="optimizer steps between accuracy probes")
    parser.add_argument("--smooth", type=int, default=3, help="probes averaged when checking a target")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.82, 0.84, 0.86])
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--uniform-mix", type=float, default=0.2)
    parser.add_argument("--methods", nargs="+", default=["uniform", "adaptive", "reducible"],
                        choices=["uniform", "adaptive", "reducible"], help="uniform must come first")
    parser.add_argument("--holdout-size", type=int, default=2_000,
                        help="training images outside the subset that reducible's irreducible-loss model trains on")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on a shared CPU, 2 threads spin)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(args)
    warm_up(data, args)
    if args.methods[0] != "uniform":
        parser.error("`--methods` must start with uniform (the reference of every ratio)")
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in args.methods}
    for seed in args.seeds:
        for method in runs:
            runs[method].append(run(method, seed, data, args))
            print(f"seed {seed} {method}: {runs[method][-1]['steps_to']} final {runs[method][-1]['final_acc_probe']}")
    summary = summarize(runs, args.targets)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    environment = {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version(),
                   "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}  # fmt: skip
    write_json(args.out, {"config": config, "environment": environment, "summary": summary, "runs": runs})
    print_table(summary, args.targets, list(runs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

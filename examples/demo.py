# Run: bash .ci/setup && python3 examples/demo.py
"""The main job: a short real training on Fashion-MNIST with lightning_synth on.

The analyzer prints the weakness profile after each validation; targeted augmentation (the bank at random
with a tilt towards the weak perturbations) makes data for it each epoch; the sampler mixes real and synthetic
samples at the synthetic weight. Every figure
goes through a CSV logger (or offline W&B with `--wandb`), so it needs no account and no network.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_synth import AdaptiveSampling, FailureModeCallback, SyntheticDataModule
from lightning_synth.datasets import FASHION_MNIST_CLASSES, FashionMNISTDataModule
from lightning_synth.demos import ImageClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--wandb", action="store_true", help="log to W&B (offline unless WANDB_MODE is set)")
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()

    L.seed_everything(0)
    real = FashionMNISTDataModule(batch_size=128, train_size=args.train_size, val_size=2000)
    datamodule = SyntheticDataModule(real, synthetic_budget=0.25)
    analyzer = FailureModeCallback(max_samples=512, class_names=[c.split("/")[0] for c in FASHION_MNIST_CLASSES],
                                   verbose=True)
    if args.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        logger: L.pytorch.loggers.Logger = WandbLogger(project="lightning_synth-demo", save_dir=args.out)
    else:
        logger = CSVLogger(args.out, name="demo")
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger,
                        callbacks=[analyzer, AdaptiveSampling()],
                        default_root_dir=args.out, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ImageClassifier(num_classes=10), datamodule=datamodule)

    profile = analyzer.profile
    assert profile is not None
    print("\nFinal weakness profile (top 12):")
    print(profile.format(12))
    print("\nFailure frontier (severity where accuracy drops by >= 10 points):")
    for name, severity in profile.frontier.items():
        print(f"  {name:<16} {'robust up to 5' if severity is None else f'{severity:.2f}'}")
    stats = datamodule.pool.stats()
    print(f"\nSynthetic pool: {stats['size']} samples by generator {stats['count_by_generator']}; "
          f"synthetic weight {datamodule.weighting.weight:.3f}")
    print(f"Logs in {trainer.log_dir}")
    pictures = sorted(Path(trainer.log_dir or args.out).glob("lightning_synth/*.png"))
    if pictures:
        print("Profile pictures (accuracy gap per perturbation x severity; frontiers over epochs):")
        for picture in pictures:
            print(f"  {picture}")
        print(f"Redraw them from the saved profiles: python -m lightning_synth.report {pictures[0].parent}/"
              f"profile_epoch{profile.epoch}.json")


if __name__ == "__main__":
    main()

# Run: python3 examples/fashion_mnist_full.py [--epochs 3] [--wandb] [--serve-api]
"""Every part of lightning_synth on Fashion-MNIST.

- `FailureModeCallback`: per class, confused pairs, perturbations at five severities, a slice (`parity`:
  even vs odd class index, from a `slice_fn`).
- `SyntheticDataModule` with all three generators: `TargetedAugmentation`, `ScenarioGenerator` (with a
  user scenario for the weak slice) and `ConditionalGANGenerator` (a `ConditionalGAN` pretrained here with
  its own `Trainer`, then fitted a little more in the loop).
- `AdaptiveSampling`, the synthetic weight, the control API (`--serve-api`), W&B offline (`--wandb`).
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_synth import (
    AdaptiveSampling,
    ConditionalGAN,
    ConditionalGANGenerator,
    FailureModeCallback,
    ScenarioGenerator,
    SyntheticDataModule,
    TargetedAugmentation,
)
from lightning_synth.datasets import FASHION_MNIST_CLASSES, FashionMNISTDataModule
from lightning_synth.demos import ImageClassifier
from lightning_synth.generators import GenerationContext


def parity(batch) -> dict[str, torch.Tensor]:
    """A slice the batch does not carry: even vs odd class index."""
    return {"parity": batch[1] % 2}


def parity_scenario(value: int, n: int, context: GenerationContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Realise slice `parity=value`: real images of classes with that parity, slightly re-lit."""
    classes = torch.arange(value, context.num_classes, 2)
    images, labels = context.sample_real(n, classes)
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=context.generator)
    return (images * gain).clamp(0, 1), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--gan-steps", type=int, default=300, help="GAN pretraining steps")
    parser.add_argument("--wandb", action="store_true")
    parser.add_argument("--serve-api", action="store_true")
    parser.add_argument("--out", default="runs/full")
    args = parser.parse_args()
    L.seed_everything(0)

    real = FashionMNISTDataModule(batch_size=128, train_size=args.train_size, val_size=2000)
    gan = ConditionalGAN(num_classes=10)
    L.Trainer(max_steps=args.gan_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(gan, datamodule=real)

    datamodule = SyntheticDataModule(
        real,
        generators=[
            TargetedAugmentation(class_bias=0.5),
            ScenarioGenerator(scenarios={"parity": parity_scenario}),
            ConditionalGANGenerator(gan, train_steps=50, min_quality=0.1),
        ],
        synthetic_budget=args.train_size // 4,
        serve_api=args.serve_api,
    )
    names = [c.split("/")[0] for c in FASHION_MNIST_CLASSES]
    analyzer = FailureModeCallback(max_samples=512, class_names=names, slice_fn=parity, verbose=True)
    if args.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        logger: L.pytorch.loggers.Logger = WandbLogger(project="lightning_synth-full", save_dir=args.out)
    else:
        logger = CSVLogger(args.out, name="full")
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=logger, default_root_dir=args.out,
                        callbacks=[analyzer, AdaptiveSampling()], enable_model_summary=False)
    trainer.fit(ImageClassifier(num_classes=10), datamodule=datamodule)
    print(f"pool: {datamodule.pool.stats()['count_by_generator']}, synthetic weight {datamodule.weighting.weight:.3f}")


if __name__ == "__main__":
    main()

"""A small image classifier LightningModule for the demo, examples, tests and benchmarks.

It is an ordinary Lightning project's module: ``(x, y)`` batches, cross-entropy, ``self(x)`` in every
step. Nothing in it knows about lightning_synth.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["ImageClassifier"]


class ImageClassifier(L.LightningModule):
    """A small CNN (or MLP) classifier over ``(B, C, H, W)`` images.

    Args:
        num_classes: number of classes.
        in_channels: image channels.
        image_size: image height and width.
        arch: ``"cnn"`` (two conv blocks) or ``"mlp"``.
        width: channels of the first conv block / hidden units of the MLP.
        lr: Adam learning rate.

    Example:
        >>> model = ImageClassifier(num_classes=10, in_channels=1, image_size=8, arch="mlp")
        >>> tuple(model(torch.zeros(2, 1, 8, 8)).shape)
        (2, 10)
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        arch: Literal["cnn", "mlp"] = "cnn",
        width: int = 32,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("image_size", image_size), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if arch not in ("cnn", "mlp"):
            raise ValueError(f"`arch` must be 'cnn' or 'mlp', got {arch!r}")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        self.save_hyperparameters()
        self.net = _cnn(in_channels, width, num_classes) if arch == "cnn" else _mlp(
            in_channels * image_size * image_size, width, num_classes)

    @override
    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def _step(self, batch: Any, stage: str) -> Tensor:
        images, targets = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        acc = (logits.argmax(1) == targets).float().mean()
        self.log_dict({f"{stage}_loss": loss, f"{stage}_acc": acc}, prog_bar=stage != "train",
                      sync_dist=stage != "train")
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


def _cnn(in_channels: int, width: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def _mlp(in_features: int, width: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes))

import os

import lightning as L
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# One thread: on a small shared CPU it is faster and steadier than torch's default.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def trainer_kwargs(tmp_path, **overrides):
    """The quiet, CPU-only Trainer arguments every test uses."""
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tkw(tmp_path):
    return lambda **overrides: trainer_kwargs(tmp_path, **overrides)


class TinyDigitsClassifier(L.LightningModule):
    """A linear classifier of 8x8 digits: the smallest real `Trainer.fit` the control tests need."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def tiny_classifier():
    """The class :class:`TinyDigitsClassifier` (call it for a fresh module)."""
    return TinyDigitsClassifier

# Run: python3 examples/add_to_your_project.py
"""A plain Lightning project, plus the three lines that add lightning_synth (marked `# + lightning_synth`).

Everything else is what an ordinary Lightning user already has: a LightningModule whose steps call
`self(x)` on `(x, y)` batches, and a LightningDataModule.
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_synth  # + lightning_synth
from lightning_synth.datasets import load_fashion_mnist


class LitClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(16 * 14 * 14, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class FashionMNIST(L.LightningDataModule):
    def setup(self, stage: str) -> None:
        images, labels = load_fashion_mnist("train")
        self.train_set = TensorDataset(images[:8000], labels[:8000])
        self.val_set = TensorDataset(images[-1000:], labels[-1000:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=128, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)


if __name__ == "__main__":
    datamodule, callbacks = lightning_synth.attach(FashionMNIST())  # + lightning_synth
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        callbacks=callbacks)  # + lightning_synth (callbacks)
    trainer.fit(LitClassifier(), datamodule=datamodule)
    analyzer = callbacks[0]  # the FailureModeCallback
    print(analyzer.profile.format(8))

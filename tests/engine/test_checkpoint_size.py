"""Checkpoints carry recipes, not pixels: 3 epochs of Fashion-MNIST with the defaults stay under 2 MB."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_synth
from lightning_synth.datasets import FashionMNISTDataModule, fashion_mnist_dir
from lightning_synth.demos import ImageClassifier


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(fashion_mnist_dir()), reason="Fashion-MNIST is not installed")
def test_fashion_mnist_checkpoint_is_small_and_resume_restores_the_pool(tmp_path, tkw, capsys):
    model = ImageClassifier(num_classes=10, in_channels=1, image_size=28, arch="cnn", width=16)  # ~0.09 MB
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    data = FashionMNISTDataModule(batch_size=256, train_size=12_000, val_size=1000)
    dm, callbacks = lightning_synth.attach(data)  # the defaults: budget 1/3 of the train set, pool 2x budget
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(max_epochs=3, callbacks=[*callbacks, ckpt], **tkw(enable_checkpointing=True))
    trainer.fit(model, datamodule=dm)
    size = (tmp_path / "ckpt" / "last.ckpt").stat().st_size
    with capsys.disabled():
        print(f"\ncheckpoint {size / 1e6:.2f} MB, model {model_bytes / 1e6:.3f} MB, pool {len(dm.pool)} samples "
              f"({dm.pool.nbytes / 1e6:.1f} MB of pixels in RAM)")
    assert len(dm.pool) >= 4000 and size < 2_000_000

    # resume: the pool is replayed from its recipes, pixel for pixel
    again, _ = lightning_synth.attach(FashionMNISTDataModule(batch_size=256, train_size=12_000, val_size=1000))
    again.load_state_dict(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["SyntheticDataModule"])
    again.datamodule.setup("fit")
    again.train_dataloader()
    again.engine.restore(lightning_synth.engine.EpochContext(epoch=3))
    assert torch.equal(again.pool.sample_ids, dm.pool.sample_ids)
    assert all(torch.equal(again.pool[i][0], dm.pool[i][0]) for i in range(0, len(dm.pool), 7))

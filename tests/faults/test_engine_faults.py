"""Issue 12, engine side: each probe of a hostile or careless user ends in a clear error or a finished run.

Every test here failed on the code before the SynthesisEngine (issue 11) and passes now.
"""

import socket

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_synth
from lightning_synth import FailureModeCallback, SyntheticDataModule, TargetedAugmentation
from lightning_synth.datasets import DictDataset, DigitsDataModule, load_digits_tensors
from lightning_synth.demos import ImageClassifier
from lightning_synth.engine import EpochContext, LocalComm, SynthesisEngine
from lightning_synth.generators import SyntheticGenerator
from lightning_synth.generators.base import SyntheticBatch


def _model(cls=ImageClassifier):
    return cls(num_classes=10, image_size=8, arch="mlp", width=64, lr=1e-2)


# -- item 2 (callback side): the control server stops on every exit path ------------------------------------
def test_control_server_stops_when_training_step_raises(tkw):
    class Failing(ImageClassifier):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("user bug")

    dm, callbacks = lightning_synth.attach(DigitsDataModule(), generators=[TargetedAugmentation()],
                                           synthetic_budget=64, serve_api=True, api_token="t" * 32)
    synthesis = callbacks[-1]
    ports = []

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            ports.append(synthesis.server.port)

    with pytest.raises(RuntimeError, match="user bug"):
        L.Trainer(max_epochs=1, callbacks=[*callbacks, Spy()], **tkw()).fit(_model(Failing), datamodule=dm)
    assert synthesis.server is None and ports
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", ports[0]), timeout=1):
        pass  # nothing answers any more


# -- item 4: resume is exact ----------------------------------------------------------------------------
def _run(tmp_path, tkw, max_epochs, ckpt=None):
    torch.manual_seed(0)
    dm = SyntheticDataModule(DigitsDataModule(), generators=[TargetedAugmentation()], synthetic_budget=128,
                             plateau_patience=1)
    cbs = [FailureModeCallback(max_samples=64, perturbations=["rotation", "contrast"]),
           ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=cbs, **tkw(enable_checkpointing=True))
    trainer.fit(_model(), datamodule=dm, ckpt_path=ckpt)
    return dm


def test_resume_continues_exactly_like_a_straight_run(tmp_path, tkw):
    straight = _run(tmp_path / "a", tkw, 4)
    _run(tmp_path / "b", tkw, 2)
    resumed = _run(tmp_path / "b", tkw, 4, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert [r["weight"] for r in resumed.weighting.history] == [r["weight"] for r in straight.weighting.history]
    # the first epoch after the resume saw the synthetic loss of the epoch before it
    assert resumed.weighting.history[2]["synthetic_loss"] == straight.weighting.history[2]["synthetic_loss"]
    assert resumed.weighting.history[2]["synthetic_loss"] is not None
    assert torch.equal(resumed.pool.sample_ids, straight.pool.sample_ids)
    assert all(torch.equal(resumed.pool[i][0], straight.pool[i][0]) for i in range(len(straight.pool)))
    assert resumed.sampler is not None and straight.sampler is not None
    torch.testing.assert_close(resumed.sampler.probabilities(), straight.sampler.probabilities())


def test_resume_on_a_training_set_of_another_size_raises(tmp_path, tkw):
    _run(tmp_path, tkw, 1)
    dm = SyntheticDataModule(DigitsDataModule(val_size=300), generators=[TargetedAugmentation()],
                             synthetic_budget=128)
    trainer = L.Trainer(max_epochs=2, callbacks=[FailureModeCallback(max_samples=64)], **tkw())
    with pytest.raises(ValueError, match=r"training set of .* samples, this one has"):
        trainer.fit(_model(), datamodule=dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


# -- item 5: memory is bounded by the pool ---------------------------------------------------------------
def test_a_huge_budget_is_made_in_bounded_chunks_and_never_beyond_the_pool(tkw):
    asked = []

    class Counting(TargetedAugmentation):
        def generate(self, profile, budget, context):
            asked.append(budget)
            return super().generate(profile, budget, context)

    dm = SyntheticDataModule(DigitsDataModule(), generators=[Counting()], synthetic_budget=1_000_000,
                             max_pool_samples=3000)
    L.Trainer(max_epochs=1, **tkw()).fit(_model(), datamodule=dm)
    assert sum(asked) == 3000 and max(asked) <= dm.engine.chunk_size and len(dm.pool) == 3000


# -- item 8: a generator breaking the contract is skipped by name; NaN in real data is the user's ---------
class _Bad(SyntheticGenerator):
    name = "bad"

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def generate(self, profile, budget, context):
        n = budget + 3 if self.kind == "too_many" else budget
        inputs = torch.rand(n, *context.real_inputs.shape[1:])
        targets = torch.zeros(n, dtype=torch.long)
        if self.kind == "not_a_batch":
            return inputs, targets
        if self.kind == "shape":
            inputs = torch.rand(n, 3, 5, 5)
        elif self.kind == "dtype":
            inputs = (inputs * 255).to(torch.uint8)
        elif self.kind == "labels":
            targets = torch.full((n,), 42)
        elif self.kind == "nan":
            inputs[0] = float("nan")
        return SyntheticBatch(inputs, targets, ["x"] * n, torch.ones(n), self.name)


@pytest.mark.parametrize("kind", ["not_a_batch", "shape", "dtype", "labels", "too_many", "nan"])
def test_bad_generator_output_is_skipped_with_a_warning_naming_it(kind, tkw):
    dm = SyntheticDataModule(DigitsDataModule(), generators=[TargetedAugmentation(), _Bad(kind)],
                             synthetic_budget=128)
    with pytest.warns(RuntimeWarning, match="Generator 'bad' "):
        L.Trainer(max_epochs=1, **tkw()).fit(_model(), datamodule=dm)
    assert set(dm.pool.stats()["count_by_generator"]) == {"targeted"}


def test_nan_in_the_users_real_inputs_is_reported_as_the_users_data(tkw):
    images, labels = load_digits_tensors()
    images = images.clone()
    images[::3, 0, 0, 0] = float("nan")

    class NanDM(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=64)

    dm = SyntheticDataModule(NanDM(), generators=[TargetedAugmentation()], synthetic_budget=64)
    with pytest.raises(ValueError, match=r"Your real input data hold .* NaN"):
        L.Trainer(max_epochs=1, **tkw()).fit(_model(), datamodule=dm)


# -- item 9 (synthetic side): the user's range and dtype are kept, nothing clamped to [0, 1] --------------
def test_normalised_inputs_get_synthetic_samples_in_their_own_range():
    inputs = torch.randn(300, 1, 8, 8) * 1.5 + 0.3  # mean/std-normalised-like, far outside [0, 1]
    targets = torch.arange(300) % 10
    engine = SynthesisEngine([TargetedAugmentation()], synthetic_budget=128, real_cache_size=300)
    engine.bind(300, lambda index: (inputs[index], targets[index]))
    engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
    mixed = lightning_synth.data.MixedDataset(torch.utils.data.TensorDataset(inputs, targets), engine.pool,
                                              value_range=engine.real.value_range)
    synthetic = torch.stack([mixed[300 + i][0] for i in range(len(engine.pool))])
    assert float(synthetic.min()) < -1.0 and float(synthetic.max()) > 2.0
    exactly_zero = float((synthetic == 0).float().mean())
    assert exactly_zero < 0.05  # the clamp to [0, 1] left ~56% of pixels at exactly 0


# -- item 10 (first bullet): a datamodule without val_dataloader wraps fine --------------------------------
def test_a_datamodule_without_val_dataloader_wraps_fine(tkw):
    images, labels = load_digits_tensors()

    class TrainOnly(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=64)

    dm = SyntheticDataModule(TrainOnly(), generators=[TargetedAugmentation()], synthetic_budget=64)
    trainer = L.Trainer(max_epochs=2, **tkw())
    trainer.fit(_model(), datamodule=dm)
    assert trainer.current_epoch == 2 and len(dm.pool) == 128


# -- item 11 (first bullet): synthetic rows in dict batches get their own extra fields ---------------------
def test_synthetic_rows_of_dict_batches_get_minus_one_extra_fields(tkw):
    images, labels = load_digits_tensors()
    groups = []

    class DictDM(L.LightningDataModule):
        def train_dataloader(self):
            data = DictDataset(images[:400], labels[:400], group=(labels[:400] % 2) + 5)
            return torch.utils.data.DataLoader(data, batch_size=50)

    class Model(ImageClassifier):
        def training_step(self, batch, batch_idx):
            groups.append(batch["group"])
            return torch.nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    dm = SyntheticDataModule(DictDM(), generators=[TargetedAugmentation()], synthetic_budget=128)
    L.Trainer(max_epochs=2, **tkw()).fit(Model(image_size=8, arch="mlp"), datamodule=dm)
    seen = set(torch.cat(groups).tolist())
    assert -1 in seen and seen <= {-1, 5, 6}

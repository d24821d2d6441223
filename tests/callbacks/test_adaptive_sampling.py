import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_synth.callbacks.adaptive_sampling import AdaptiveSampling
from lightning_synth.data.sampler import AdaptiveSampler
from lightning_synth.datasets import DigitsDataModule, load_digits_tensors
from lightning_synth.irreducible import IrreducibleLoss

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": -1.0}, ValueError, "`temperature` must be a number > 0"),
        ({"uniform_mix": -0.1}, ValueError, r"`uniform_mix` must be a number in \[0, 1\]"),
        ({"ema_decay": 1.5}, ValueError, r"`ema_decay` must be a number in \[0, 1\)"),
        ({"prior": "min"}, ValueError, "`prior` must be 'mean' or 'max'"),
        ({"num_samples": 0}, ValueError, "`num_samples` must be an integer >= 1 or None, got 0"),
        ({"seed": "0"}, ValueError, "`seed` must be an integer or None"),
        ({"batch_adapter": 3}, TypeError, "`batch_adapter` must be a BatchAdapter"),
        ({"loss_fn": "ce"}, TypeError, "`loss_fn` must be a callable"),
        ({"normalize": "rank"}, ValueError, "`normalize` must be 'batch' or 'none', got 'rank'"),
        ({"capture_module": ""}, ValueError, "`capture_module` must be a non-empty submodule name"),
        ({"irreducible": "rho"}, TypeError, "`irreducible` must be an IrreducibleLoss or None, got str"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveSampling(**kwargs)


class Classifier(L.LightningModule):
    """8x8 digits MLP; counts training forward calls; can return per-sample losses or call a submodule."""

    def __init__(self, lr: float = 0.1, mode: str = "forward", nan_every: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.lr, self.mode, self.nan_every = lr, mode, nan_every
        self.train_forwards = 0

    def forward(self, images):
        if self.training:
            self.train_forwards += 1
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        logits = self.net(images) if self.mode == "submodule" else self(images)
        losses = F.cross_entropy(logits, labels, reduction="none")
        if self.mode != "per_sample":
            return losses.mean()
        per_sample = batch[2].float() + 1.0  # the dataset index, to check the row -> index mapping
        if self.nan_every:
            per_sample = torch.where(batch[2] % self.nan_every == 0, float("nan"), per_sample)
        return {"loss": losses.mean(), "per_sample_loss": per_sample}

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _trainer(tmp_path, callbacks, **kwargs):
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _indexed_loader(batch_size=32, num_workers=0, drop_last=False, n=300):
    images, labels = load_digits_tensors()
    dataset = TensorDataset(images[:n], labels[:n], torch.arange(n))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=drop_last)


def test_installs_its_sampler_and_updates_weights(tmp_path):
    callback = AdaptiveSampling()
    trainer = _trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(Classifier(), datamodule=DigitsDataModule(batch_size=64))
    sampler = trainer.train_dataloader.sampler
    assert isinstance(sampler, AdaptiveSampler) and sampler is callback.sampler
    assert sampler.stats()["seen_ratio"] == 1.0  # uniform first epoch: a permutation, every sample seen
    assert trainer.callback_metrics["adaptive_sampling/mass/real"] == pytest.approx(1.0)
    assert "adaptive_sampling/ess_ratio" in trainer.callback_metrics
    assert not torch.allclose(sampler.probabilities(), torch.full_like(sampler.probabilities(), 1 / 997))


@pytest.mark.parametrize(("num_workers", "drop_last", "accumulate", "limit"), [(0, False, 1, 1.0), (2, True, 2, 5)])
def test_batch_rows_map_to_dataset_indices(tmp_path, num_workers, drop_last, accumulate, limit):
    callback = AdaptiveSampling()
    trainer = _trainer(
        tmp_path,
        [callback],
        max_epochs=2,
        accumulate_grad_batches=accumulate,
        limit_train_batches=limit,
        limit_val_batches=0,
    )
    trainer.fit(Classifier(mode="per_sample"), train_dataloaders=_indexed_loader(32, num_workers, drop_last, n=300))
    indices, losses, scores = callback.last_update.values()
    assert torch.equal(losses.double(), indices.double() + 1.0)  # every loss landed on its own index
    assert torch.allclose(scores[:32], losses[:32] / losses[:32].mean())  # relative to its batch
    batches = 9 if drop_last else 10
    batches = min(batches, limit) if isinstance(limit, int) else batches
    expected = callback.sampler.epoch_indices[: min(batches * 32, 300)]
    assert indices.tolist() == expected.tolist()  # in this epoch's draw order, nothing more, nothing less


def test_logits_capture_adds_no_forward_call(tmp_path):
    def fit(callbacks):
        L.seed_everything(0)
        model = Classifier(lr=0.0)  # frozen, so captured losses can be recomputed afterwards
        _trainer(tmp_path, callbacks, limit_val_batches=0).fit(model, train_dataloaders=_indexed_loader())
        return model

    plain = fit([])
    callback = AdaptiveSampling(normalize="none")
    model = fit([callback])
    assert model.train_forwards == plain.train_forwards == 10
    images, labels = load_digits_tensors()
    indices, losses, scores = callback.last_update.values()
    with torch.no_grad():
        expected = F.cross_entropy(model.net(images[indices]), labels[indices], reduction="none")
    assert torch.allclose(losses, expected, atol=1e-5) and torch.equal(scores, losses)


def test_capture_module_for_steps_that_skip_self_call(tmp_path):
    callback = AdaptiveSampling()
    with pytest.warns(RuntimeWarning, match="saw no per-sample losses"):
        _trainer(tmp_path, [callback], limit_val_batches=0).fit(
            Classifier(mode="submodule"), train_dataloaders=_indexed_loader()
        )
    assert callback.last_update["indices"].numel() == 0
    callback = AdaptiveSampling(capture_module="net")
    _trainer(tmp_path, [callback], limit_val_batches=0).fit(
        Classifier(mode="submodule"), train_dataloaders=_indexed_loader()
    )
    assert callback.last_update["indices"].numel() == 300
    with pytest.raises(ValueError, match=r"`capture_module` must name a submodule .* top-level submodules: \['net'\]"):
        _trainer(tmp_path, [AdaptiveSampling(capture_module="backbone")]).fit(
            Classifier(), train_dataloaders=_indexed_loader()
        )


def test_nan_losses_are_skipped_and_counted(tmp_path):
    callback = AdaptiveSampling()
    with pytest.warns(RuntimeWarning, match=r"skipped 43 of 300 non-finite losses"):
        _trainer(tmp_path, [callback], limit_val_batches=0).fit(
            Classifier(mode="per_sample", nan_every=7), train_dataloaders=_indexed_loader()
        )
    probs = callback.sampler.probabilities()
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    assert callback.sampler.stats()["seen_ratio"] == pytest.approx(257 / 300)


def test_uses_the_users_sampler_or_explains(tmp_path):
    images, labels = load_digits_tensors()
    dataset = TensorDataset(images[:200], labels[:200])
    own = AdaptiveSampler(dataset, temperature=2.0)
    callback = AdaptiveSampling(install_sampler=False)
    _trainer(tmp_path, [callback], limit_val_batches=0).fit(
        Classifier(), train_dataloaders=DataLoader(dataset, batch_size=50, sampler=own)
    )
    assert callback.sampler is own and own.stats()["seen_ratio"] == 1.0
    with pytest.raises(RuntimeError, match="has no AdaptiveSampler and `AdaptiveSampling\\(install_sampler=False\\)`"):
        _trainer(tmp_path, [AdaptiveSampling(install_sampler=False)]).fit(
            Classifier(), train_dataloaders=DataLoader(dataset, batch_size=50)
        )


class _Recorder(Callback):
    def __init__(self, sampling: AdaptiveSampling) -> None:
        self.sampling, self.draws, self.probs = sampling, {}, {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.draws[trainer.current_epoch] = self.sampling.sampler.epoch_indices.clone()
        self.probs[trainer.current_epoch] = self.sampling.sampler.probabilities()


@pytest.mark.parametrize(("on_train_epoch_end", "reducible"), [(False, False), (True, False), (False, True)],
                         ids=["saved_before_update", "saved_after_update", "reducible_loss"])
def test_resume_gives_the_same_weights_and_draw(tmp_path, on_train_epoch_end, reducible):
    def fit(max_epochs, run, ckpt_path=None):
        L.seed_everything(0)
        sampling = AdaptiveSampling(irreducible=IrreducibleLoss(epochs=1) if reducible else None)
        recorder = _Recorder(sampling)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / run, save_last=True, save_on_train_epoch_end=on_train_epoch_end)
        trainer = _trainer(
            tmp_path,
            [sampling, recorder, checkpoint],
            max_epochs=max_epochs,
            enable_checkpointing=True,
            limit_val_batches=2,
        )
        trainer.fit(Classifier(), datamodule=DigitsDataModule(batch_size=64, num_workers=1), ckpt_path=ckpt_path)
        return recorder

    straight = fit(3, "straight")
    fit(2, "stopped")
    resumed = fit(3, "resumed", ckpt_path=str(tmp_path / "stopped" / "last.ckpt"))
    assert 2 in resumed.draws  # a checkpoint from validation end first finishes epoch 1 (its update)
    for epoch in resumed.draws:
        assert torch.equal(resumed.draws[epoch], straight.draws[epoch])
        assert torch.equal(resumed.probs[epoch], straight.probs[epoch])
    pending = torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)["callbacks"]["AdaptiveSampling"][
        "pending"
    ]
    assert pending["indices"].numel() == (0 if on_train_epoch_end else 997)  # losses not yet applied ride along


def test_reducible_loss_scores_subtract_the_heldout_model(tmp_path):
    il = IrreducibleLoss(perturbations=["gaussian_noise", "rotation"])
    callback = AdaptiveSampling(irreducible=il)
    trainer = _trainer(tmp_path, [callback], max_epochs=2, limit_val_batches=0)
    model = Classifier()
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert il.fitted  # trained at fit start on the datamodule's validation split
    sampler = callback.sampler
    stored = sampler.irreducible_losses
    assert torch.isfinite(stored).all()  # every sample was drawn, each got its estimate once
    train = trainer.datamodule.train_dataloader().dataset
    sample = torch.tensor([0, 5, 9])
    x = torch.stack([train[int(i)][0] for i in sample])
    y = torch.tensor([int(train[int(i)][1]) for i in sample])
    assert torch.allclose(il(model, x, y).double(), stored[sample], atol=1e-5)
    indices, losses, scores = callback.last_update.values()
    first = slice(0, 64)  # one batch: (loss - irreducible loss) / the batch's mean loss
    expected = (losses[first].double() - stored[indices[first]]) / losses[first].double().mean()
    assert torch.allclose(scores[first].double(), expected, atol=1e-5)


def test_reducible_loss_needs_heldout_data(tmp_path):
    trainer = _trainer(tmp_path, [AdaptiveSampling(irreducible=IrreducibleLoss())])
    with pytest.raises(RuntimeError, match="IrreducibleLoss trains its model on held-out data"):
        trainer.fit(Classifier(), train_dataloaders=_indexed_loader())


_DDP_SCRIPT = """
import json, sys
import lightning as L, torch
from lightning.pytorch.callbacks import Callback
sys.path.insert(0, {test_dir!r})
from test_adaptive_sampling import Classifier
from lightning_synth.callbacks.adaptive_sampling import AdaptiveSampling
from lightning_synth.datasets import DigitsDataModule

class Dump(Callback):
    def __init__(self, sampling):
        self.sampling, self.epochs = sampling, []
    def on_train_epoch_end(self, trainer, pl_module):
        update = self.sampling.last_update
        self.epochs.append({{"indices": update["indices"].tolist(), "scores": update["scores"].tolist(),
                            "epoch_indices": self.sampling.sampler.epoch_indices.tolist()}})
    def on_train_end(self, trainer, pl_module):
        sampler = self.sampling.sampler
        out = {{"rank": trainer.global_rank, "epochs": self.epochs,
               "probabilities": sampler.probabilities().tolist(),
               "seed": sampler.seed, "total_size": sampler.total_size}}
        with open(f"{{sys.argv[1]}}/rank{{trainer.global_rank}}.json", "w") as fh:
            json.dump(out, fh)

if __name__ == "__main__":
    L.seed_everything(0)
    sampling = AdaptiveSampling()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, limit_val_batches=0,
                        callbacks=[sampling, Dump(sampling)], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=sys.argv[1])
    trainer.fit(Classifier(), datamodule=DigitsDataModule(batch_size=32))
    torch.distributed.destroy_process_group()  # gloo's threads otherwise can abort the interpreter's exit
"""


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(test_dir=str(Path(__file__).parent))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["probabilities"] == ranks[1]["probabilities"]  # bitwise identical on both ranks

    single = AdaptiveSampler(
        range(997), num_replicas=1, rank=0, seed=ranks[0]["seed"], num_samples=ranks[0]["total_size"]
    )
    for epoch, (rank0, rank1) in enumerate(zip(ranks[0]["epochs"], ranks[1]["epochs"], strict=True)):
        assert rank0["indices"] == rank1["indices"] and rank0["scores"] == rank1["scores"]  # same gathered pairs
        single.set_epoch(epoch)  # both shards interleave into the single-process draw of the same weights
        shards = torch.tensor([rank0["epoch_indices"], rank1["epoch_indices"]]).T.reshape(-1)
        assert shards.tolist() == list(single)
        assert len(rank0["indices"]) == 2 * len(rank0["epoch_indices"])  # every row of both ranks arrived
        single.update(torch.tensor(rank0["indices"]), torch.tensor(rank0["scores"]))
    assert single.probabilities().tolist() == ranks[0]["probabilities"]


def test_train_source_hook_supported(tkw):
    """The one private Lightning attribute lightning_synth touches (``fit_loop._data_source``), pinned to the
    Lightning versions it is known to exist in; a new Lightning release must be checked and the range widened."""
    import lightning
    from packaging.version import Version

    from lightning_synth.callbacks._hooks import wrap_train_source

    assert Version("2.1") <= Version(lightning.__version__) < Version("2.7"), lightning.__version__
    trainer = L.Trainer(max_epochs=1, **tkw())
    seen = []
    undo = wrap_train_source(trainer, lambda loader: seen.append(loader) or loader)
    assert callable(undo)
    undo()
    assert "dataloader" not in vars(trainer.fit_loop._data_source)

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_synth
from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback, SynthesisCallback
from lightning_synth.consistency import jsd_consistency
from lightning_synth.data import SyntheticDataModule
from lightning_synth.datasets import DictDataset, DigitsDataModule, load_digits_tensors
from lightning_synth.demos import ImageClassifier
from lightning_synth.generators import SyntheticGenerator, TargetedAugmentation


class Boom(SyntheticGenerator):
    name = "boom"

    def generate(self, profile, budget, context):
        raise RuntimeError("kaput")


def _model():
    return ImageClassifier(num_classes=10, image_size=8, arch="mlp", width=64, lr=1e-2)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="`datamodule` must be a LightningDataModule"):
        SyntheticDataModule(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`generators` must hold SyntheticGenerator"):
        SyntheticDataModule(DigitsDataModule(), generators=[object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unique names"):
        SyntheticDataModule(DigitsDataModule(), generators=[TargetedAugmentation(), TargetedAugmentation()])
    with pytest.raises(ValueError, match="`real_cache_size` must be >= 1"):
        SyntheticDataModule(DigitsDataModule(), real_cache_size=0)
    with pytest.raises(ValueError, match="synthetic_budget"):
        SyntheticDataModule(DigitsDataModule(), synthetic_budget=-1)
    with pytest.raises(ValueError, match="`min_generator_share`"):
        SyntheticDataModule(DigitsDataModule(), min_generator_share=1.5)
    with pytest.raises(ValueError, match=r"`synthetic_budget` must be in \(0.0, 1.0\]"):
        SyntheticDataModule(DigitsDataModule(), synthetic_budget=1.5)
    with pytest.raises(TypeError, match="`synthetic_budget` must be an int"):
        SyntheticDataModule(DigitsDataModule(), synthetic_budget="10")  # type: ignore[arg-type]


def test_end_to_end_pool_follows_profile_and_failing_generator_is_skipped(tkw):
    dm = SyntheticDataModule(DigitsDataModule(), generators=[TargetedAugmentation(), Boom()], synthetic_budget=512,
                             max_pool_samples=2048)
    analyzer = FailureModeCallback(max_samples=128)
    trainer = L.Trainer(max_epochs=3, callbacks=[analyzer], **tkw())
    with pytest.warns(RuntimeWarning, match="Generator 'boom' raised RuntimeError"):
        trainer.fit(_model(), datamodule=dm)
    kinds = [type(c) for c in trainer.callbacks]
    assert AdaptiveSampling in kinds and SynthesisCallback in kinds and kinds.count(FailureModeCallback) == 1
    # Every epoch refreshed (epoch 0 from an empty profile: uniform over the bank); the failing generator's
    # share of the budget is lost, nothing else.
    assert set(dm.generated) == {"targeted"} and len(dm.pool) == dm.generated["targeted"] > 1024
    # The pool follows the profile: the weakest perturbation family gets more samples than the least weak.
    scores = analyzer.history[-1].perturbation_scores()
    counts: dict[str, int] = {}
    for key, n in dm.pool.stats()["count_by_weakness"].items():
        name = key.split("/")[1].split("@")[0]
        counts[name] = counts.get(name, 0) + n
    ranked = sorted(scores, key=scores.get)
    assert counts.get(ranked[-1], 0) > counts.get(ranked[0], 0), (scores, counts)
    metrics = trainer.callback_metrics
    assert {"synth/weight", "synth/pool_size", "synth/mass_synthetic"} <= set(metrics)
    assert 0 < float(metrics["synth/mass_synthetic"]) < 1


def test_dict_samples_keep_their_format(tkw):
    images, labels = load_digits_tensors()

    class DictDM(L.LightningDataModule):
        def train_dataloader(self):
            data = DictDataset(images[:400], labels[:400], group=(labels[:400] % 2))
            return torch.utils.data.DataLoader(data, batch_size=50)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(DictDataset(images[400:600], labels[400:600]), batch_size=50)

    seen = set()

    class Model(ImageClassifier):
        def training_step(self, batch, batch_idx):
            seen.add(tuple(sorted(batch)))
            return torch.nn.functional.cross_entropy(self(batch["image"]), batch["label"])

        def validation_step(self, batch, batch_idx):
            self(batch["image"])

    dm = SyntheticDataModule(DictDM(), generators=[TargetedAugmentation()], synthetic_budget=128)
    L.Trainer(max_epochs=2, callbacks=[FailureModeCallback(max_samples=64, perturbations=["rotation"])],
              **tkw()).fit(Model(image_size=8, arch="mlp"), datamodule=dm)
    assert seen == {("group", "image", "label")} and len(dm.pool) == 256
    # a synthetic sample has no group of its own: -1, not the first real sample's group
    assert dm.mixed is not None
    synthetic = dm.mixed[dm.mixed.num_real]
    assert int(synthetic["group"]) == -1 and int(dm.mixed[0]["group"]) in (0, 1)


def test_deliver_source_recipe_trains_with_the_sampler_reading_each_samples_own_loss(tkw):
    """The README's recipe: cross-entropy on the real sources, Jensen-Shannon between source and sample; the
    sampler reads the batch's own rows of the forward on ``[x, source]``, with no extra forward and no warning."""
    dm, callbacks = lightning_synth.attach(DigitsDataModule(), generators=[TargetedAugmentation()],
                                           synthetic_budget=256, deliver_source=True)
    pairs = []

    class Model(ImageClassifier):
        def training_step(self, batch, batch_idx):
            x, y, source = batch
            pairs.append(int((x != source).flatten(1).any(1).sum()))
            logits, source_logits = self(torch.cat([x, source])).chunk(2)
            return F.cross_entropy(source_logits, y) + 12.0 * jsd_consistency(source_logits, logits)

    sampling = next(c for c in callbacks if isinstance(c, AdaptiveSampling))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="AdaptiveSampling")
        L.Trainer(max_epochs=2, callbacks=callbacks, **tkw()).fit(Model(image_size=8, arch="mlp"), datamodule=dm)
    assert sum(pairs) > 100  # synthetic samples arrive with a source that differs from them
    assert sampling.last_update is not None and len(sampling.last_update["indices"]) == dm.mixed.num_real
    mixed, num_real = dm.mixed, dm.mixed.num_real
    sources = dm.pool.sources(range(len(dm.pool)))
    assert bool((sources >= 0).all()) and len(sources) == 512
    for k in (0, 100, 511):  # a sample's source is the real sample it was made from: same label, its input
        synthetic, y, source = mixed[num_real + k]
        real_x, real_y = mixed.real[int(sources[k])]
        assert int(y) == int(real_y) and torch.equal(source, real_x) and not torch.equal(synthetic, real_x)
    with pytest.raises(TypeError, match="`deliver_source` must be a bool, got int: 1"):
        SyntheticDataModule(DigitsDataModule(), deliver_source=1)  # type: ignore[arg-type]


def test_fractional_budget_and_default_capacity(tkw):
    dm, callbacks = lightning_synth.attach(DigitsDataModule(), generators=[TargetedAugmentation()],
                                           synthetic_budget=0.25)
    L.Trainer(max_epochs=1, callbacks=callbacks, **tkw()).fit(_model(), datamodule=dm)
    num_real = dm.mixed.num_real
    budget = max(round(0.25 * num_real), 256)
    assert dm.controller.settings.synthetic_budget == budget and len(dm.pool) == budget
    assert dm.pool.capacity == 2 * budget
    assert any(f"of {num_real} real samples" in e.message for e in dm.controller.history)


def test_loader_keeps_every_argument_and_user_range_and_dtype(tkw):
    images, labels = load_digits_tensors()
    uint8 = (images[:400] * 255).round().to(torch.uint8)

    def init_fn(worker_id):
        pass

    generator = torch.Generator().manual_seed(5)

    class Uint8DM(L.LightningDataModule):
        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(uint8, labels[:400])
            return torch.utils.data.DataLoader(data, batch_size=50, worker_init_fn=init_fn, generator=generator,
                                               pin_memory=False, timeout=0)

    dm = SyntheticDataModule(Uint8DM(), generators=[TargetedAugmentation()], synthetic_budget=128)
    dtypes = set()

    class Model(ImageClassifier):
        def training_step(self, batch, batch_idx):
            dtypes.add(batch[0].dtype)
            return super().training_step((batch[0].float() / 255, batch[1]), batch_idx)

    # no val_dataloader in the wrapped datamodule: the wrapper has none either
    L.Trainer(max_epochs=1, **tkw()).fit(Model(image_size=8, arch="mlp"), datamodule=dm)
    loader = dm.train_dataloader()
    assert loader.worker_init_fn is init_fn and loader.generator is generator
    assert dtypes == {torch.uint8}  # synthetic rows come back in the user's dtype
    x, _ = dm.mixed[dm.mixed.num_real]
    assert x.dtype == torch.uint8 and int(x.max()) > 1


def test_resume_gives_same_pool_and_weights(tmp_path, tkw):
    def run(max_epochs, ckpt=None):
        dm = SyntheticDataModule(DigitsDataModule(), generators=[TargetedAugmentation()], synthetic_budget=128)
        cbs = [FailureModeCallback(max_samples=64, perturbations=["rotation", "contrast"]),
               ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
        trainer = L.Trainer(max_epochs=max_epochs, callbacks=cbs, **tkw(enable_checkpointing=True))
        trainer.fit(_model(), datamodule=dm, ckpt_path=ckpt)
        return dm

    run(2)
    resumed = run(2, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))  # restores and stops at once
    again = SyntheticDataModule(DigitsDataModule(), generators=[TargetedAugmentation()], synthetic_budget=128)
    again.load_state_dict(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["SyntheticDataModule"])
    assert len(resumed.pool) == len(again.pool) == 256
    assert torch.equal(resumed.pool.sample_ids, again.pool.sample_ids)
    assert resumed.weighting.weight == again.weighting.weight
    assert resumed.generated == again.generated == {"targeted": 256}


def test_checkpoint_carries_recipes_and_resume_restores_identical_pixels(tmp_path, tkw):
    from lightning_synth.engine import EpochContext

    dm = SyntheticDataModule(DigitsDataModule(), generators=[TargetedAugmentation()], synthetic_budget=300)
    cbs = [FailureModeCallback(max_samples=64, perturbations=["rotation", "contrast"]),
           ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    L.Trainer(max_epochs=3, callbacks=cbs, **tkw(enable_checkpointing=True)).fit(_model(), datamodule=dm)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["SyntheticDataModule"]
    assert state["engine"]["pool"]["pixels"]["inputs"].numel() == 0  # recipes, not pixels
    again = SyntheticDataModule(DigitsDataModule(), generators=[TargetedAugmentation()], synthetic_budget=300)
    again.load_state_dict(state)
    again.datamodule.setup("fit")
    again.train_dataloader()  # binds the real data
    assert again.engine.restore(EpochContext(epoch=3)) > 0
    assert len(again.pool) == len(dm.pool) == 600
    assert torch.equal(again.pool.sample_ids, dm.pool.sample_ids)
    assert all(torch.equal(again.pool[i][0], dm.pool[i][0]) for i in range(len(dm.pool)))


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_pool_and_weight_identical_on_ranks_and_work_shared(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "ddp_synthetic_script.py"
    subprocess.run([sys.executable, str(script), str(tmp_path), "2", "ddp"], check=True, timeout=600)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["pool_size"] == 600  # 200 per refresh, one refresh per epoch
    for key in ("sample_ids", "inputs_sum", "targets", "weight", "probabilities_sum_sq"):
        assert rank0[key] == rank1[key], key
    # Each rank made only its half of each refresh: nothing was generated twice.
    assert rank0["local_budgets"] == rank1["local_budgets"] == [100, 100, 100]


def test_pool_storage_dtype_reaches_the_pool():
    assert SyntheticDataModule(DigitsDataModule()).engine.pool.storage_dtype == "uint8"
    assert SyntheticDataModule(DigitsDataModule(), pool_storage_dtype="float32").engine.pool.storage_dtype == "float32"
    with pytest.raises(ValueError, match="`pool_storage_dtype` must be one of"):
        SyntheticDataModule(DigitsDataModule(), pool_storage_dtype="int4")  # type: ignore[arg-type]

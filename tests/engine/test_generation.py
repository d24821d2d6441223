"""The real cache read in blocks (the same cache as one read, no transient its size) and the generation call
over uint8 levels (the same samples as over float32)."""

import pytest
import torch

from lightning_synth.engine.generation import RealCache, run_part
from lightning_synth.generators import ScenarioGenerator, TargetedAugmentation
from lightning_synth.profile import Weakness, WeaknessProfile
from lightning_synth.value_range import ValueRange

N = 300


def _levels(seed=0):
    return torch.randint(0, 256, (N, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


DATA = {
    "uint8": lambda: _levels(),
    "float_over_255": lambda: _levels().float() / 255,
    "unit_floats": lambda: torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
    "normalised": lambda: (_levels().float() / 255 - 0.29) / 0.35,
    "int32": lambda: _levels().int() ** 2 // 7 - 100,
}


def _one_read(inputs, targets, index):
    """The cache as it was built before: one call for the whole index, then detect, map and pack."""
    value_range = ValueRange.detect(inputs[index])
    return RealCache.build(value_range.to_unit(inputs[index]), targets[index].long(), index, value_range,
                           int(targets[index].max()) + 1)


@pytest.mark.parametrize("kind", list(DATA))
def test_reading_in_blocks_gives_the_cache_of_one_read(kind):
    inputs, targets = DATA[kind](), torch.arange(N) % 7
    index = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:250]
    calls = []

    def real_sample(idx):
        calls.append(idx.clone())
        return inputs[idx], targets[idx]

    cache = RealCache.read(real_sample, index, block_bytes=1000)
    expected = _one_read(inputs, targets, index)
    assert cache.value_range == expected.value_range and cache.num_classes == expected.num_classes == 7
    assert cache.pixels.dtype == expected.pixels.dtype and torch.equal(cache.pixels, expected.pixels)
    assert torch.equal(cache.targets, expected.targets) and torch.equal(cache.index, index)
    assert torch.equal(cache.inputs, expected.inputs)
    # in order, every index once, in blocks of at most block_bytes of inputs (the first block is one row)
    assert torch.equal(torch.cat(calls), index) and len(calls) > 2
    row = inputs[0].numel() * inputs.element_size()
    assert len(calls[0]) == 1 and max(len(c) for c in calls) == max(1000 // row, 1)


def test_levels_are_kept_for_8bit_data_only():
    assert RealCache.read(lambda i: (DATA["uint8"]()[i], i), torch.arange(N)).pixels.dtype == torch.uint8
    assert RealCache.read(lambda i: (DATA["float_over_255"]()[i], i), torch.arange(N)).pixels.dtype == torch.uint8
    for kind in ("unit_floats", "normalised", "int32"):
        assert RealCache.read(lambda i, k=kind: (DATA[k]()[i], i), torch.arange(N)).pixels.dtype == torch.float32


def test_non_finite_data_in_any_block_raise_as_one_read_does():
    inputs = torch.rand(N, 1, 8, 8)
    inputs[-3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError) as whole:
        ValueRange.detect(inputs)
    with pytest.raises(ValueError) as blocks:
        RealCache.read(lambda i: (inputs[i], i), torch.arange(N), block_bytes=500)
    assert str(blocks.value) == str(whole.value) and "hold 1 NaN or infinite values" in str(blocks.value)


def _profile():
    return WeaknessProfile(frontier={"rotation": 2.0}, weaknesses=[
        Weakness(kind="perturbation", name="rotation", severity=3, error_rate=0.6, gap=0.5, support=64),
        Weakness(kind="class", name="3", target=3, error_rate=0.5, gap=0.3, support=20)])


@pytest.mark.parametrize("generator", [TargetedAugmentation(class_bias=0.5), ScenarioGenerator()],
                         ids=["targeted", "scenario"])
def test_a_call_over_levels_makes_the_samples_of_a_call_over_float32(generator):
    levels = RealCache.read(lambda i: (DATA["float_over_255"]()[i], torch.arange(N)[i] % 10), torch.arange(N))
    floats = RealCache(levels.inputs, levels.targets, levels.index, levels.value_range, levels.num_classes)
    assert levels.pixels.dtype == torch.uint8 and floats.pixels.dtype == torch.float32
    device = torch.device("cpu")
    a = run_part(generator, _profile(), 40, 123, levels, device, 1, None)
    b = run_part(generator, _profile(), 40, 123, floats, device, 1, None)
    assert a is not None and b is not None and len(a) > 0
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and a.weakness == b.weakness
    assert (a.source_index is None) == (b.source_index is None)


def test_a_fit_on_8bit_data_keeps_levels_and_a_resume_replays_identical_pixels(tmp_path, tkw):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_synth.callbacks import FailureModeCallback
    from lightning_synth.data import SyntheticDataModule
    from lightning_synth.datasets import load_digits_tensors
    from lightning_synth.demos import ImageClassifier
    from lightning_synth.engine import EpochContext

    images, labels = load_digits_tensors()
    levels = (images * 255).round().to(torch.uint8)

    class Uint8Digits(L.LightningDataModule):
        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(levels[:500], labels[:500])
            return torch.utils.data.DataLoader(data, batch_size=50, shuffle=True)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(levels[500:700], labels[500:700]),
                                               batch_size=100)

    class Model(ImageClassifier):  # takes the user's uint8 batches (the analyzer's probes come in them too)
        def forward(self, x):
            return super().forward(x.float() / 255)

    def synthetic():
        return SyntheticDataModule(Uint8Digits(), generators=[TargetedAugmentation()], synthetic_budget=150)

    dm = synthetic()
    callbacks = [FailureModeCallback(max_samples=64, perturbations=["rotation", "contrast"]),
                 ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    L.Trainer(max_epochs=2, callbacks=callbacks, **tkw(enable_checkpointing=True)).fit(
        Model(image_size=8, arch="mlp"), datamodule=dm)
    assert dm.engine.real.pixels.dtype == torch.uint8 and len(dm.pool) == 300
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["SyntheticDataModule"]
    again = synthetic()
    again.load_state_dict(state)
    again.train_dataloader()  # binds the real data
    assert again.engine.restore(EpochContext(epoch=2)) > 0
    assert torch.equal(again.pool.sample_ids, dm.pool.sample_ids)
    assert all(torch.equal(again.pool[i][0], dm.pool[i][0]) for i in range(len(dm.pool)))

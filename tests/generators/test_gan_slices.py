"""Slice conditioning of `ConditionalGAN` and slice targeting of `ConditionalGANGenerator`, on 8x8 digits.

The slice attribute here is ``label % 3`` for most digits, a stand-in for a spurious attribute; digit 9 never
appears with slice 2 in training (an absent cell).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_synth.datasets import load_digits_tensors
from lightning_synth.generators.base import GenerationContext
from lightning_synth.generators.gan import ConditionalGAN
from lightning_synth.generators.gan_generator import ConditionalGANGenerator, cells_from_data
from lightning_synth.profile import Weakness, WeaknessProfile

SLICED: dict[str, Any] = {"latent_dim": 8, "image_size": 8, "width": 8, "categories": ["clean"], "num_slices": 3}


def slices_of(labels: Tensor) -> Tensor:
    return labels % 3


@pytest.fixture(scope="module")
def data() -> tuple[Tensor, Tensor, Tensor]:
    images, labels = load_digits_tensors()
    return images, labels, slices_of(labels)


@pytest.fixture(scope="module")
def sliced_gan(data: tuple[Tensor, Tensor, Tensor], tmp_path_factory: pytest.TempPathFactory) -> ConditionalGAN:
    L.seed_everything(0)
    gan = ConditionalGAN(**SLICED)
    images, labels, slices = data
    loader = DataLoader(TensorDataset(images, labels, {"group": slices}["group"]), batch_size=64, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=60, enable_progress_bar=False, enable_model_summary=False,
                        logger=False, enable_checkpointing=False, default_root_dir=tmp_path_factory.mktemp("gan"))
    trainer.fit(gan, loader)  # (x, y, group) batches: the batch adapter reads the slice as "group"
    return gan


def slice_weakness(name: str, gap: float) -> Weakness:
    return Weakness(kind="slice", name=name, error_rate=min(gap + 0.1, 1.0), gap=gap, support=40)


def context(data: tuple[Tensor, Tensor, Tensor], seed: int = 0, **kwargs: Any) -> GenerationContext:
    images, labels, slices = data
    return GenerationContext(images[:256], labels[:256], 10, torch.Generator().manual_seed(seed),
                             extras={"slices": {"group": slices[:256]}}, **kwargs)


def test_trainer_fit_counts_the_cells_it_saw(sliced_gan: ConditionalGAN) -> None:
    counts = sliced_gan.cell_counts
    assert counts.shape == (10, 3) and float(counts.sum()) >= 1797  # 30 batches (two optimizer steps each)
    seen = counts > 0
    assert all(bool(seen[c, c % 3]) for c in range(10)) and int(seen.sum()) == 10  # one slice per digit


def test_slices_change_the_samples_and_are_checked(sliced_gan: ConditionalGAN) -> None:
    classes, clean = torch.full((4,), 9), torch.zeros(4, dtype=torch.long)
    a = sliced_gan.sample(classes, clean, torch.Generator().manual_seed(0), slices=torch.zeros(4, dtype=torch.long))
    b = sliced_gan.sample(classes, clean, torch.Generator().manual_seed(0), slices=torch.full((4,), 2))
    assert not torch.equal(a, b)  # the absent cell (9, 2) is composed from its own embeddings
    with pytest.raises(ValueError, match=r"`slices` must be in \[0, 3\)"):
        sliced_gan.sample(classes, clean, slices=torch.full((4,), 3))
    with pytest.raises(TypeError, match="`slices` must be a 1-D integer tensor of length 4"):
        sliced_gan.sample(classes, clean, slices=torch.zeros(4))
    with pytest.raises(ValueError, match="pass `slices`"):
        ConditionalGAN(**SLICED).fit_steps(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 1)


def test_training_step_needs_the_slice_in_the_batch(tmp_path: Path) -> None:
    gan = ConditionalGAN(**{**SLICED, "slice_key": "colour"})
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.arange(8) % 10), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(KeyError, match="conditioned on slice 'colour'"):
        trainer.fit(gan, loader)


def test_generator_targets_the_weak_cells(sliced_gan: ConditionalGAN, data: tuple[Tensor, Tensor, Tensor]) -> None:
    profile = WeaknessProfile(weaknesses=[slice_weakness("group=2", 0.4), slice_weakness("colour=1", 0.3)])
    batch = ConditionalGANGenerator(sliced_gan, class_check="none").generate(profile, 90, context(data))
    assert len(batch) == 90 and set(batch.weakness) == {"slice/group=2"}  # "colour" is not the GAN's slice
    assert set(batch.targets.tolist()) == {2, 5, 8}  # the classes seen in slice 2, in proportion to their counts


def test_generator_composes_an_unseen_slice_with_every_class(data: tuple[Tensor, Tensor, Tensor]) -> None:
    gan = ConditionalGAN(**SLICED)  # untrained: no cell seen
    profile = WeaknessProfile(weaknesses=[slice_weakness("group=1", 0.4)])
    batch = ConditionalGANGenerator(gan, class_check="none").generate(profile, 200, context(data))
    assert set(batch.targets.tolist()) == set(range(10))


def test_class_check_keeps_only_samples_of_their_class(sliced_gan: ConditionalGAN,
                                                        data: tuple[Tensor, Tensor, Tensor]) -> None:
    profile = WeaknessProfile(weaknesses=[slice_weakness("group=0", 0.4)])
    checked = ConditionalGANGenerator(sliced_gan, class_check="auxiliary").generate(profile, 60, context(data))
    assert len(checked) > 0
    assert torch.equal(sliced_gan.classify(checked.inputs).argmax(1), checked.targets)

    class Says3(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    by_task = ConditionalGANGenerator(sliced_gan, class_check="task", max_rounds=2).generate(
        profile, 60, context(data, task_model=Says3()))
    assert set(by_task.targets.tolist()) == {3}  # the task model only confirms class 3


def test_in_loop_training_reads_the_slices_from_the_context(sliced_gan: ConditionalGAN,
                                                            data: tuple[Tensor, Tensor, Tensor]) -> None:
    generator = ConditionalGANGenerator(copy.deepcopy(sliced_gan), train_steps=2, batch_size=16)
    before = float(generator.gan.cell_counts.sum())
    generator.generate(WeaknessProfile(), 4, context(data))
    assert float(generator.gan.cell_counts.sum()) == before + 32
    bare = GenerationContext(data[0][:64], data[1][:64], 10, torch.Generator().manual_seed(0))
    with pytest.raises(KeyError, match=r"context.extras\['slices'\]\['group'\]"):
        generator.generate(WeaknessProfile(), 4, bare)


def test_weak_groups_map_to_cells_of_the_gans_slice(sliced_gan: ConditionalGAN,
                                                     data: tuple[Tensor, Tensor, Tensor]) -> None:
    _, labels, slices = data
    groups = labels * 3 + slices  # another attribute: one value per (class, slice) cell
    cells = cells_from_data(groups, labels, slices, 30)
    assert cells[7 * 3 + 1].tolist() == [7, 1] and cells[7 * 3 + 2].tolist() == [-1, -1]
    generator = ConditionalGANGenerator(sliced_gan, slice_cells={"cell": cells})
    profile = WeaknessProfile(weaknesses=[slice_weakness("cell=22", 0.4), slice_weakness("cell=23", 0.3)])
    batch = generator.generate(profile, 20, context(data))
    assert set(batch.targets.tolist()) == {7} and set(batch.weakness) == {"slice/cell=22"}  # 23: no such cell
    with pytest.raises(ValueError, match="must have shape"):
        ConditionalGANGenerator(sliced_gan, slice_cells={"cell": torch.zeros(3)})

# Run from the repository root:
#   python -m benchmarks.worst_group                      # the nine methods below, seeds 0 1 2
#   python -m benchmarks.worst_group --methods erm dfr lightning_synth --seeds 0 --epochs 1 --train-size 5000
"""Worst-group benchmark: a spurious colour in Fashion-MNIST.

Every image is tinted into RGB. In training, each class wears its own colour in ``--train-agreement``
(95%) of its images and a random other colour otherwise; in validation, the held-out split and test the
colour is drawn independently of the class. A model that reads the colour instead of the shape fails on the
rare (class, colour) groups. Groups are ``group = label * 10 + colour`` (100 groups); validation and
held-out batches are ``(x, y, group)``, training batches ``(x, y)`` (only Group DRO, the upper reference,
sees training groups). The held-out split (``--heldout-size``) is the group-labelled data DFR and the GAN
learn from; validation is for choosing settings; test is only reported.

Methods (same network, optimizer, batch size and optimizer steps as in :mod:`benchmarks.common`):

- ``erm``;
- ``jtt`` (Just Train Twice, Liu et al. 2021): ERM for ``--jtt-epochs``, then the final model trains on the
  training set with its misclassified points repeated ``--jtt-upweight`` times; the identification run is
  extra cost (``extra s``);
- ``dfr`` (Deep Feature Reweighting, Kirichenko et al. 2023): ERM, then the last layer refit on the held-out
  split with every group weighted equally (:class:`~lightning_synth.callbacks.SliceBalancedRefit` without its
  tilt, ``--dfr-weight-decay`` chosen on validation);
- ``erm_refit``: ERM, then lightning_synth's refit (``SliceBalancedRefit``'s defaults: cell-balanced, tilted
  towards the worst groups): the same refit as lightning_synth on ERM's features;
- ``group_dro`` (Sagawa et al. 2020): online exponentiated-gradient weights over *training* groups (an upper
  reference, not a fair competitor);
- ``recolour_uniform``: lightning_synth's loop with the user's re-colouring applied to random real samples
  with random colours, at the same synthetic share (does targeting matter?);
- ``ls_user_scenario``: lightning_synth's loop, the analyzer's weak validation groups realised by the user's
  re-colouring scenario;
- ``lightning_synth`` (headline): the analyzer's weak validation groups realised by a class- and
  group-conditioned :class:`~lightning_synth.generators.ConditionalGAN` fitted on the held-out split (its
  time is ``extra s``), then the last layer refit on the held-out groups by ``SliceBalancedRefit`` with its
  defaults (``--no-refit``: none); no user function. Its accuracies just before the refit are the row
  ``lightning_synth_before_refit``;
- ``ls_no_gan``: lightning_synth's loop and refit without the GAN (no synthetic samples).

Reports average and worst-group test accuracy, and the mean of the worst 10% of groups (mean ± std over
seeds: with 100 small groups the single worst one is often 0 for every method), the same on validation, and
paired per-seed differences with 95% t intervals (:data:`PAIRS`); writes ``<results-dir>/worst_group.json``
and ``<results-dir>/worst_group.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import (
    Classifier,
    Method,
    MethodContext,
    add_common_arguments,
    check_common_args,
    classifier_factory,
    context_from_args,
    export_torchscript,
    fit,
    format_table,
    pm,
    predict,
    pyplot,
    quiet_lightning,
    register_method,
    resolve_methods,
    run_method,
    summarize,
    write_json,
)
from lightning_synth.batch import BatchView
from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback, SliceBalancedRefit
from lightning_synth.data import SyntheticDataModule
from lightning_synth.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from lightning_synth.generators import ConditionalGAN, ConditionalGANGenerator, ScenarioGenerator
from lightning_synth.generators.base import GenerationContext, SyntheticBatch, SyntheticGenerator
from lightning_synth.generators.gan import CLEAN
from lightning_synth.generators.gan_generator import cells_from_data
from lightning_synth.profile import WeaknessProfile

TASK = "worst_group"
# Every (method, seed) run builds a fresh datamodule; decoding the IDX files once per process is enough.
_load_fashion_mnist = functools.lru_cache(maxsize=2)(load_fashion_mnist)
NUM_COLOURS = 10
COLOUR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta", "white", "pink")
# Every colour has a channel at exactly 1, so the grey image is recovered as the max over channels.
PALETTE = torch.tensor(
    [
        [1.0, 0.1, 0.1],
        [1.0, 0.55, 0.0],
        [1.0, 1.0, 0.0],
        [0.2, 1.0, 0.2],
        [0.0, 1.0, 1.0],
        [0.15, 0.35, 1.0],
        [0.6, 0.2, 1.0],
        [1.0, 0.0, 1.0],
        [1.0, 1.0, 1.0],
        [1.0, 0.6, 0.6],
    ]
)


@dataclass(frozen=True)
class GroupLayout:
    """Groups are (class, colour) pairs numbered ``label * num_colours + colour``."""

    num_classes: int = 10
    num_colours: int = NUM_COLOURS

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.num_colours

    def group(self, labels: Tensor, colours: Tensor) -> Tensor:
        return labels * self.num_colours + colours

    def split(self, groups: Tensor) -> tuple[Tensor, Tensor]:
        """``(labels, colours)`` of ``groups``."""
        return groups // self.num_colours, groups % self.num_colours

    def name(self, group: int) -> str:
        return f"{FASHION_MNIST_CLASSES[group // self.num_colours]}/{COLOUR_NAMES[group % self.num_colours]}"


LAYOUT = GroupLayout()


def tint(grey: Tensor, colours: Tensor) -> Tensor:
    """Colour grey images ``(B, 1, H, W)`` (float in [0, 1] or uint8) with ``PALETTE[colours]``.

    Returns:
        Float images ``(B, 3, H, W)`` in [0, 1].
    """
    grey = grey.float().div(255) if grey.dtype == torch.uint8 else grey
    return grey * PALETTE.to(grey)[colours].view(-1, 3, 1, 1)


def recolour(images: Tensor, colours: Tensor | int) -> Tensor:
    """Give tinted images ``(B, 3, H, W)`` new colours (an int or ``(B,)``): the worst-group scenario.

    Example:
        >>> grey = torch.rand(2, 1, 28, 28)
        >>> torch.allclose(recolour(tint(grey, torch.tensor([0, 1])), 5), tint(grey, torch.tensor([5, 5])))
        True
    """
    colours = torch.as_tensor(colours, device=images.device).expand(len(images))
    return tint(images.amax(1, keepdim=True), colours)


def recolour_scenario(value: int, n: int, context: GenerationContext) -> tuple[Tensor, Tensor]:
    """A ``ScenarioGenerator`` slice scenario for slice ``"group"``: ``n`` images of group ``value``.

    Real training images of the group's class (``context.sample_real``) re-coloured to the group's colour:
    the rare (class, colour) combinations that the spurious correlation starves.

    Example:
        >>> grey, labels = torch.rand(8, 1, 28, 28), torch.arange(8) % 2
        >>> context = GenerationContext(tint(grey, labels), labels, 10, torch.Generator().manual_seed(0))
        >>> images, targets = recolour_scenario(LAYOUT.group(torch.tensor(1), torch.tensor(6)).item(), 4, context)
        >>> targets.tolist(), bool((images.amax((2, 3)).argmax(1) == 2).all())  # class 1, purple (blue max)
        ([1, 1, 1, 1], True)
    """
    label, colour = divmod(int(value), NUM_COLOURS)
    images, labels = context.sample_real(n, torch.tensor([label]))
    return recolour(images, colour), labels


def sample_colours(labels: Tensor, agreement: float | None, generator: torch.Generator) -> Tensor:
    """The class's colour with probability ``agreement``, else a random other one; ``None``: independent."""
    if agreement is None:
        return torch.randint(NUM_COLOURS, labels.shape, generator=generator)
    other = (labels + torch.randint(1, NUM_COLOURS, labels.shape, generator=generator)) % NUM_COLOURS
    keep = torch.rand(labels.shape, generator=generator) < agreement
    return torch.where(keep, labels % NUM_COLOURS, other)


class TintedDataset(Dataset):
    """Grey uint8 images tinted on the fly: items ``(x, y)`` or ``(x, y, group)``; optional index list."""

    def __init__(
        self, grey: Tensor, labels: Tensor, colours: Tensor, with_groups: bool, indices: Tensor | None = None,
        with_colours: bool = False,
    ) -> None:
        self.grey, self.labels, self.colours, self.with_groups = grey, labels, colours, with_groups
        self.groups = LAYOUT.group(labels, colours)
        self.indices, self.with_colours = indices, with_colours

    def __len__(self) -> int:
        return len(self.labels) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        i = int(self.indices[index]) if self.indices is not None else index
        image = tint(self.grey[i : i + 1], self.colours[i : i + 1])[0]
        if self.with_colours:
            return image, self.labels[i], {"group": self.groups[i], "colour": self.colours[i]}
        return (image, self.labels[i], self.groups[i]) if self.with_groups else (image, self.labels[i])

    def images(self) -> Tensor:
        """All images (ignoring ``indices``), tinted, as float ``(N, 3, H, W)``."""
        return tint(self.grey, self.colours)

    def predict(self, model: nn.Module, chunk: int = 5000) -> Tensor:
        """``model``'s predicted classes for every image (ignoring ``indices``), tinting chunk by chunk."""
        parts = [
            predict(model, tint(self.grey[i : i + chunk], self.colours[i : i + chunk]))
            for i in range(0, len(self.labels), chunk)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class ColouredFashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST tinted with a class-correlated colour in training, independent colour in val/test.

    Args:
        batch_size: samples per batch.
        val_size: samples of the official train split held out for validation.
        train_size: optional cap on training samples; test_size: on test samples.
        train_agreement: probability that a training image wears its class's colour.
        seed: seed of the split, subsets and colours.
        train_groups: training batches carry groups ``(x, y, group)`` (Group DRO only).
        heldout_size: samples of the official train split held out, besides validation, with independent
            colours and group labels: what DFR retrains its last layer on and what lightning_synth's GAN
            learns the (class, colour) cells from (0: none). Taken before the training subset.
        num_workers: DataLoader workers.

    Attributes:
        train_indices: optional indices into the training set, repeats allowed (JTT's upsampling); set it
            before ``train_dataloader`` is called.
    """

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 5000,
        train_size: int | None = None,
        test_size: int | None = None,
        train_agreement: float = 0.95,
        seed: int = 0,
        train_groups: bool = False,
        num_workers: int = 0,
        heldout_size: int = 0,
    ) -> None:
        super().__init__()
        if heldout_size < 0:
            raise ValueError(f"`heldout_size` must be >= 0, got {heldout_size}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if not 0 < val_size < 60000:
            raise ValueError(f"`val_size` must be in (0, 60000), got {val_size}")
        if not 0.0 <= train_agreement <= 1.0:
            raise ValueError(f"`train_agreement` must be in [0, 1], got {train_agreement}")
        for name, value in (("train_size", train_size), ("test_size", test_size)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None, got {value}")
        self.batch_size, self.val_size, self.train_size, self.test_size = (
            batch_size,
            val_size,
            train_size,
            test_size,
        )
        self.train_agreement, self.seed, self.num_workers = train_agreement, seed, num_workers
        self.train_groups, self.heldout_size = train_groups, heldout_size
        self.train_indices: Tensor | None = None
        self.heldout_set: TintedDataset | None = None
        self.train_set: TintedDataset | None = None
        self.val_set: TintedDataset | None = None
        self.test_set: TintedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        images, labels = _load_fashion_mnist("train")
        grey = images.mul(255).round().to(torch.uint8)
        order = torch.randperm(len(labels), generator=g)
        val, rest = order[: self.val_size], order[self.val_size :]
        heldout, train = rest[: self.heldout_size], rest[self.heldout_size :][: self.train_size]
        self.train_set = self._tinted(grey[train], labels[train], self.train_agreement, g)
        self.val_set = self._tinted(grey[val], labels[val], None, g)
        self.heldout_set = self._tinted(grey[heldout], labels[heldout], None, g) if len(heldout) else None
        test_images, test_labels = _load_fashion_mnist("test")
        keep = torch.randperm(len(test_labels), generator=g)[: self.test_size]
        self.test_set = self._tinted(test_images.mul(255).round().to(torch.uint8)[keep], test_labels[keep], None, g)

    @staticmethod
    def _tinted(grey: Tensor, labels: Tensor, agreement: float | None, g: torch.Generator) -> TintedDataset:
        return TintedDataset(grey, labels, sample_colours(labels, agreement, g), with_groups=True)

    def _loader(self, dataset: TintedDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call `setup()` before asking for a dataloader.")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("Call `setup()` before asking for a dataloader.")
        s = self.train_set
        return self._loader(
            TintedDataset(s.grey, s.labels, s.colours, self.train_groups, self.train_indices), shuffle=True
        )

    def heldout_dataloader(self, batch_size: int | None = None, shuffle: bool = True) -> DataLoader:
        """Batches ``(x, y, {"group": g, "colour": c})`` of the held-out split (see ``heldout_size``)."""
        s = self.heldout_set
        if s is None:
            raise RuntimeError("No held-out split: build the datamodule with `heldout_size > 0` and call `setup()`.")
        dataset = TintedDataset(s.grey, s.labels, s.colours, True, with_colours=True)
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class GroupDROLoss(nn.Module):
    """Online Group DRO objective (Sagawa et al. 2020): exponentiated-gradient weights ``q`` over groups.

    Each step: per-group mean loss ``l_g`` on the batch, ``q <- q * exp(step_size * l_g)`` normalised, loss
    ``sum_g q_g l_g``. ``q`` is a buffer, so it is checkpointed and moves with the module.

    Example:
        >>> dro = GroupDROLoss(num_groups=2)
        >>> groups = {"group": torch.tensor([0, 1])}
        >>> view = BatchView(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), groups)
        >>> round(float(dro(torch.tensor([1.0, 3.0]), view)), 3)
        2.01
    """

    q: Tensor

    def __init__(self, num_groups: int, step_size: float = 0.01) -> None:
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"`num_groups` must be >= 1, got {num_groups}")
        if not step_size > 0:
            raise ValueError(f"`step_size` must be > 0, got {step_size}")
        self.num_groups, self.step_size = num_groups, step_size
        self.register_buffer("q", torch.full((num_groups,), 1.0 / num_groups))

    def forward(self, losses: Tensor, view: BatchView) -> Tensor:
        if "group" not in view.slices:
            raise RuntimeError(f"Group DRO needs training batches (x, y, group); got slices {list(view.slices)}")
        one_hot = F.one_hot(view.slices["group"].long(), self.num_groups).to(losses)
        group_loss = (one_hot * losses[:, None]).sum(0) / one_hot.sum(0).clamp_min(1)
        with torch.no_grad():
            q = self.q * torch.exp(self.step_size * group_loss.detach())
            self.q.copy_(q / q.sum())
        return (self.q * group_loss).sum()


def make_jtt(identify_epochs: int = 1, upweight: int = 20) -> Method:
    """Just Train Twice: ERM for ``identify_epochs``, then retrain with its errors seen ``upweight`` times."""
    if identify_epochs < 1 or upweight < 1:
        raise ValueError(f"`identify_epochs` and `upweight` must be >= 1, got {identify_epochs}, {upweight}")

    def wrap(dm: L.LightningDataModule, ctx: MethodContext) -> L.LightningDataModule:
        if not isinstance(dm, ColouredFashionMNISTDataModule):
            raise TypeError(f"JTT needs a ColouredFashionMNISTDataModule, got {type(dm).__name__}")
        dm.setup("fit")
        assert dm.train_set is not None
        identifier = ctx.classifier()
        steps = identify_epochs * ctx.steps_per_epoch
        stats = fit(
            identifier,
            dm,
            max_steps=steps,
            root_dir=ctx.root_dir / "jtt-identify",
            accelerator=ctx.accelerator,
        )
        wrong = (dm.train_set.predict(identifier) != dm.train_set.labels).nonzero().squeeze(1)
        dm.train_indices = torch.cat([torch.arange(len(dm.train_set)), wrong.repeat(upweight - 1)])
        ctx.info.update(jtt_error_set=len(wrong), jtt_identify_steps=steps, jtt_identify_seconds=stats["train_seconds"])
        L.seed_everything(ctx.seed, workers=True, verbose=False)  # the final model starts like ERM's
        return dm

    return Method(
        "jtt",
        (TASK,),
        wrap_datamodule=wrap,
        description=f"JTT: ERM {identify_epochs} epoch(s), errors upsampled x{upweight}, retrain",
    )


def make_group_dro(step_size: float = 0.01) -> Method:
    """Group DRO with training group labels: an upper reference, not a fair competitor."""

    def wrap(dm: L.LightningDataModule, ctx: MethodContext) -> L.LightningDataModule:
        if not isinstance(dm, ColouredFashionMNISTDataModule):
            raise TypeError(f"Group DRO needs a ColouredFashionMNISTDataModule, got {type(dm).__name__}")
        dm.train_groups = True
        return dm

    make = classifier_factory(make_objective=lambda ctx: GroupDROLoss(LAYOUT.num_groups, step_size))
    return Method(
        "group_dro",
        (TASK,),
        make_module=make,
        wrap_datamodule=wrap,
        description=f"Group DRO (training group labels), step size {step_size}",
    )


def heldout_refit(dm: L.LightningDataModule, **settings: float) -> SliceBalancedRefit:
    """A :class:`SliceBalancedRefit` on the held-out split's groups (DFR's data); ``dm`` is the task's
    datamodule or a ``SyntheticDataModule`` around it; ``settings``: the refit's arguments (default: the
    library's defaults)."""
    real = getattr(dm, "datamodule", dm)
    if not isinstance(real, ColouredFashionMNISTDataModule):
        raise TypeError(f"The refit needs a ColouredFashionMNISTDataModule, got {type(real).__name__}")
    if real.heldout_size == 0:
        raise ValueError("The refit needs the held-out split: run with `--heldout-size` > 0.")
    return SliceBalancedRefit(lambda: real.heldout_dataloader(1000, shuffle=False), slice_key="group", **settings)


class BeforeRefit(Callback):
    """Records the model's group accuracies (test and validation) at the end of fit, before a later callback
    refits its last layer: the same run, without the refit, for the ablation row ``<method>_before_refit``."""

    def __init__(self, datamodule: ColouredFashionMNISTDataModule, info: dict[str, Any]) -> None:
        self.datamodule, self.info = datamodule, info

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        test, val = self.datamodule.test_set, self.datamodule.val_set
        assert isinstance(pl_module, Classifier) and test is not None and val is not None
        self.info["before_refit"] = {**group_accuracy(pl_module, test), "val": group_accuracy(pl_module, val)}


def make_dfr(weight_decay: float = 1e-5) -> Method:
    """DFR: ERM, then the last layer retrained group-balanced on the held-out split (its group labels), every
    group weighing the same throughout (no tilt); ``weight_decay`` chosen on validation (README)."""

    def callbacks(ctx: MethodContext, dm: L.LightningDataModule) -> list[Callback]:
        return [heldout_refit(dm, weight_decay=weight_decay, dro_step_size=0.0)]

    return Method("dfr", (TASK,), make_callbacks=callbacks,
                  description=f"DFR: ERM, last layer refit group-balanced on the held-out split (wd {weight_decay})")


def make_erm_refit() -> Method:
    """ERM, then :class:`SliceBalancedRefit` with the library's defaults (the tilt towards the worst groups):
    lightning_synth's refit on ERM's features, the ablation that credits the loop's features."""

    def callbacks(ctx: MethodContext, dm: L.LightningDataModule) -> list[Callback]:
        return [heldout_refit(dm)]

    return Method("erm_refit", (TASK,), make_callbacks=callbacks,
                  description="ERM, then SliceBalancedRefit with the library defaults on the held-out split")


class NoSamples(SyntheticGenerator):
    """A generator that makes nothing: the loop (analyzer, adaptive sampling) on real data only.

    Example:
        >>> context = GenerationContext(torch.rand(4, 3, 28, 28), torch.arange(4), 10, torch.Generator())
        >>> len(NoSamples().generate(WeaknessProfile(), 8, context))
        0
    """

    name = "none"

    def generate(self, profile: WeaknessProfile, budget: int, context: GenerationContext) -> SyntheticBatch:
        del profile, budget
        return SyntheticBatch.empty(self.name, context.real_inputs)


class UniformRecolour(SyntheticGenerator):
    """The user's re-colouring applied to random real samples with uniformly random colours (no targeting).

    Example:
        >>> grey, labels = torch.rand(8, 1, 28, 28), torch.arange(8) % 2
        >>> context = GenerationContext(tint(grey, labels), labels, 10, torch.Generator().manual_seed(0))
        >>> batch = UniformRecolour().generate(WeaknessProfile(), 5, context)
        >>> len(batch), set(batch.weakness)
        (5, {'uniform'})
    """

    name = "recolour_uniform"

    def generate(self, profile: WeaknessProfile, budget: int, context: GenerationContext) -> SyntheticBatch:
        del profile
        images, labels = context.sample_real(budget)
        colours = torch.randint(NUM_COLOURS, (budget,), generator=context.generator)
        return SyntheticBatch(recolour(images, colours), labels, ["uniform"] * budget, torch.ones(budget), self.name)


def synthetic_method(
    name: str, make_generators: Callable[[L.LightningDataModule, MethodContext], list[SyntheticGenerator]],
    share: float = 0.5, description: str = "",
    make_end_callbacks: Callable[[L.LightningDataModule, MethodContext], list[Callback]] | None = None,
) -> Method:
    """A lightning_synth run on this task: ``share * train_size`` synthetic samples per refresh (pool twice
    that), the analyzer on validation (its group slices), adaptive sampling; only the generators differ.
    ``make_end_callbacks``: more callbacks, after the others (e.g. a :class:`SliceBalancedRefit`)."""

    def wrap(dm: L.LightningDataModule, ctx: MethodContext) -> L.LightningDataModule:
        generators = make_generators(dm, ctx)
        budget = max(256, int(ctx.train_size * share))
        return SyntheticDataModule(
            dm, generators=generators, synthetic_budget=budget, max_pool_samples=2 * budget, real_cache_size=8192,
            initial_synthetic_weight=1.0, seed=ctx.seed, sampler_temperature=2.0, sampler_uniform_mix=0.2,
        )

    def callbacks(ctx: MethodContext, dm: L.LightningDataModule) -> list[Callback]:
        end = make_end_callbacks(dm, ctx) if make_end_callbacks is not None else []
        return [FailureModeCallback(max_samples=256, seed=ctx.seed, max_groups=LAYOUT.num_groups),
                AdaptiveSampling(seed=ctx.seed), *end]

    return Method(name, (TASK,), make_callbacks=callbacks, wrap_datamodule=wrap, description=description or name)


def make_slice_gan(
    dm: ColouredFashionMNISTDataModule, seed: int, steps: int = 300, width: int = 16, root_dir: Path | None = None,
    accelerator: str = "cpu", batch_size: int = 64, slice_key: str = "group",
) -> tuple[ConditionalGAN, float]:
    """A :class:`ConditionalGAN` conditioned on class and ``slice_key`` (``"group"``: 100 values, or
    ``"colour"``: 10), fitted with ``Trainer.fit`` on the held-out split's batches; returns it and its
    training seconds."""
    dm.setup("fit")
    L.seed_everything(seed, workers=True, verbose=False)
    gan = ConditionalGAN(latent_dim=32, num_classes=LAYOUT.num_classes, categories=[CLEAN], image_size=28, channels=3,
                         width=width, num_slices=LAYOUT.num_groups if slice_key == "group" else NUM_COLOURS,
                         slice_key=slice_key)
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root_dir or Path(tempfile.gettempdir())))
    start = time.perf_counter()
    trainer.fit(gan, train_dataloaders=dm.heldout_dataloader(batch_size))
    return gan.cpu().eval(), time.perf_counter() - start


def make_lightning_synth(
    gan_steps: int = 300, gan_width: int = 16, min_quality: float = 0.0, class_check: str = "auxiliary",
    share: float = 0.5, gan_slice: str = "group", refit: bool = True,
) -> Method:
    """The headline: slices from the validation group labels, a slice-conditioned GAN, no user function.

    ``gan_slice="colour"``: the GAN is conditioned on the held-out batches' colour attribute; the weak
    groups the analyzer reports are mapped to (class, colour) cells by :func:`cells_from_data` on the
    held-out samples (which carry both attributes). ``refit``: at the end, a :class:`SliceBalancedRefit` of
    the last layer on the held-out groups with the library's defaults (on the features the GAN's samples
    shaped); the accuracies just before it are recorded too (:class:`BeforeRefit`).
    """

    def generators(dm: L.LightningDataModule, ctx: MethodContext) -> list[SyntheticGenerator]:
        if not isinstance(dm, ColouredFashionMNISTDataModule):
            raise TypeError(f"lightning_synth needs a ColouredFashionMNISTDataModule, got {type(dm).__name__}")
        gan, seconds = make_slice_gan(dm, ctx.seed, gan_steps, gan_width, ctx.root_dir / "gan",
                                      "cpu" if ctx.accelerator == "auto" else ctx.accelerator, slice_key=gan_slice)
        ctx.info.update(gan_steps=gan_steps, gan_seconds=seconds)
        L.seed_everything(ctx.seed, workers=True, verbose=False)  # the classifier starts like ERM's
        held = dm.heldout_set
        assert held is not None
        cells = {} if gan_slice == "group" else {
            "group": cells_from_data(held.groups, held.labels, held.colours, LAYOUT.num_groups)}
        return [ConditionalGANGenerator(gan, min_quality=min_quality, class_check=class_check, slice_cells=cells)]

    def make_refit(dm: L.LightningDataModule, ctx: MethodContext) -> list[Callback]:
        real = getattr(dm, "datamodule", dm)
        assert isinstance(real, ColouredFashionMNISTDataModule)
        return [BeforeRefit(real, ctx.info), heldout_refit(dm)]

    tail = "; last layer refit group-balanced on the held-out split" if refit else ""
    return synthetic_method(
        "lightning_synth", generators, share,
        f"GAN conditioned on class and {gan_slice} ({gan_steps} steps on the held-out split), slices from "
        f"validation groups, no user function; class check {class_check}, min quality {min_quality}{tail}",
        make_end_callbacks=make_refit if refit else None,
    )


def make_ls_no_gan(share: float = 0.5) -> Method:
    """lightning_synth's loop and refit without the GAN: the same analyzer, adaptive sampling and
    :class:`SliceBalancedRefit`, no synthetic samples (what the GAN adds over the refit alone)."""

    def refit(dm: L.LightningDataModule, ctx: MethodContext) -> list[Callback]:
        return [heldout_refit(dm)]

    return synthetic_method("ls_no_gan", lambda dm, ctx: [NoSamples()], share,
                            "lightning_synth's loop and refit without the GAN (no synthetic samples)",
                            make_end_callbacks=refit)


def make_user_scenario(share: float = 0.5) -> Method:
    return synthetic_method(
        "ls_user_scenario", lambda dm, ctx: [ScenarioGenerator(scenarios=ctx.extras["scenarios"], mix={"slice": 1.0})],
        share, "lightning_synth with the user's re-colouring scenario for the weak groups",
    )


def make_recolour_uniform(share: float = 0.5) -> Method:
    return synthetic_method("recolour_uniform", lambda dm, ctx: [UniformRecolour()], share,
                            "the user's re-colouring on random samples, same synthetic share (no targeting)")


register_method(make_jtt())
register_method(make_group_dro())
register_method(make_dfr())
register_method(make_erm_refit())
register_method(make_ls_no_gan())
register_method(make_recolour_uniform())
register_method(make_user_scenario())
DEFAULT_METHODS = ("erm", "jtt", "dfr", "erm_refit", "group_dro", "recolour_uniform", "ls_user_scenario",
                   "ls_no_gan", "lightning_synth")
PAIRS = (
    ("lightning_synth", "jtt"), ("lightning_synth", "dfr"), ("lightning_synth", "erm"),
    ("lightning_synth", "ls_no_gan"), ("lightning_synth", "erm_refit"), ("ls_no_gan", "erm_refit"),
    ("erm_refit", "dfr"),
    ("lightning_synth", "lightning_synth_before_refit"), ("lightning_synth_before_refit", "erm"),
    ("ls_user_scenario", "recolour_uniform"), ("lightning_synth", "ls_user_scenario"),
)


def task_extras() -> dict[str, Any]:
    """What a method finds in ``ctx.extras`` for this task (e.g. to build lightning_synth's scenarios).

    - ``layout``: :class:`GroupLayout` (``group(labels, colours)``, ``split(groups)``, ``name(group)``);
    - ``num_groups``: 100; ``slice_key``: ``"group"`` (the third element of validation batches);
    - ``scenarios``: ``{"group": recolour_scenario}``, ready for
      ``ScenarioGenerator(scenarios=ctx.extras["scenarios"])``: it realises a weak group ``(y, colour)`` by
      re-colouring real class-``y`` images;
    - ``recolour``: ``(images (B,3,H,W), colours int|(B,)) -> images``, the re-colouring itself;
    - ``palette``, ``colour_names``.
    """
    return {
        "scenarios": {"group": recolour_scenario},
        "layout": LAYOUT,
        "num_groups": LAYOUT.num_groups,
        "slice_key": "group",
        "recolour": recolour,
        "palette": PALETTE.clone(),
        "colour_names": COLOUR_NAMES,
    }


def group_accuracy(model: Classifier, dataset: TintedDataset) -> dict[str, Any]:
    """Average accuracy, per-group accuracy (groups present only), the worst group and the worst decile.

    With 100 small groups the single worst group often sits at 0 for every method; ``worst_decile`` (mean
    accuracy of the worst 10% of groups) and ``mean_group`` still separate methods.
    """
    correct = (dataset.predict(model) == dataset.labels).float()
    per_group = {int(g): float(correct[dataset.groups == g].mean()) for g in dataset.groups.unique()}
    worst = min(per_group, key=per_group.__getitem__)
    ranked = sorted(per_group.values())
    return {
        "average": float(correct.mean()),
        "worst_group": per_group[worst],
        "worst_group_name": LAYOUT.name(worst),
        "worst_decile": statistics.fmean(ranked[: max(1, math.ceil(len(ranked) / 10))]),
        "mean_group": statistics.fmean(per_group.values()),
        "groups_evaluated": len(per_group),
        "per_group": {LAYOUT.name(g): acc for g, acc in per_group.items()},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--train-agreement", type=float, default=0.95)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--jtt-epochs", type=int, default=1)
    parser.add_argument("--jtt-upweight", type=int, default=20)
    parser.add_argument("--dro-step-size", type=float, default=0.01)
    parser.add_argument("--heldout-size", type=int, default=2000,
                        help="held-out samples with group labels (DFR's last layer, lightning_synth's GAN)")
    parser.add_argument("--dfr-weight-decay", type=float, default=1e-5,
                        help="DFR's L2 penalty (chosen on validation from 0, 1e-5, 1e-4, ..., 1e-1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="train nothing: pool the runs of these results files (e.g. more seeds of some methods; "
                             "a later file's run of a method and seed replaces an earlier one) and write the table "
                             "and paired intervals of the union")
    parser.add_argument("--gan-steps", type=int, default=300)
    parser.add_argument("--gan-width", type=int, default=16)
    parser.add_argument("--gan-min-quality", type=float, default=0.0)
    parser.add_argument("--gan-class-check", default="auxiliary", choices=("auxiliary", "task", "none"))
    parser.add_argument("--gan-slice", default="colour", choices=("group", "colour"),
                        help="the held-out attribute the GAN is conditioned on besides the class")
    parser.add_argument("--no-refit", action="store_true",
                        help="lightning_synth without its end-of-fit slice-balanced refit of the last layer")
    parser.add_argument("--synthetic-share", type=float, default=0.5,
                        help="synthetic samples per refresh, as a share of the real training set")
    args = parser.parse_args(argv)
    check_common_args(args)
    if not 0 <= args.train_agreement <= 1:
        raise ValueError(f"`--train-agreement` must be in [0, 1], got {args.train_agreement}")
    if args.jtt_epochs < 1 or args.jtt_upweight < 1:
        raise ValueError(
            f"`--jtt-epochs` and `--jtt-upweight` must be >= 1, got {args.jtt_epochs}, {args.jtt_upweight}"
        )
    if not args.dro_step_size > 0:
        raise ValueError(f"`--dro-step-size` must be > 0, got {args.dro_step_size}")
    if args.threads < 1:
        raise ValueError(f"`--threads` must be >= 1, got {args.threads}")
    if args.heldout_size < 0 or args.gan_steps < 1 or args.gan_width < 1 or not 0 < args.synthetic_share <= 4:
        raise ValueError("`--heldout-size` must be >= 0, `--gan-steps`/`--gan-width` >= 1 and `--synthetic-share` "
                         f"in (0, 4], got {args.heldout_size}, {args.gan_steps}, {args.gan_width}, "
                         f"{args.synthetic_share}")
    return args


def make_datamodule(args: argparse.Namespace) -> ColouredFashionMNISTDataModule:
    return ColouredFashionMNISTDataModule(
        batch_size=args.batch_size,
        val_size=args.val_size,
        train_size=args.train_size,
        test_size=args.test_size,
        train_agreement=args.train_agreement,
        seed=args.data_seed,
        heldout_size=args.heldout_size,
    )


def make_context(args: argparse.Namespace, seed: int, train_size: int, root_dir: Path) -> MethodContext:
    return context_from_args(args, TASK, seed, train_size, root_dir, in_channels=3, extras=task_extras())


def _extra_seconds(info: Mapping[str, Any]) -> float:
    """Training outside the main fit: JTT's identification run, lightning_synth's GAN."""
    return float(info.get("jtt_identify_seconds", 0.0)) + float(info.get("gan_seconds", 0.0))


def paired_differences(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]], pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str] = ("worst_group", "worst_decile", "average"),
) -> list[dict[str, Any]]:
    """Per ``(a, b)`` pair and metric: mean of the per-seed differences ``a - b`` and its 95% t interval.

    Only seeds both methods ran; pairs with fewer than 2 shared seeds are left out.

    Example:
        >>> runs = {"a": {0: {"m": 0.5}, 1: {"m": 0.7}}, "b": {0: {"m": 0.4}, 1: {"m": 0.4}}}
        >>> [round(paired_differences(runs, [("a", "b")], ["m"])[0][k], 3) for k in ("mean", "low", "high")]
        [0.2, -1.071, 1.471]
    """
    from scipy.stats import t as student_t

    out = []
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        seeds = sorted(set(runs[a]) & set(runs[b]))
        if len(seeds) < 2:
            continue
        for metric in metrics:
            diffs = [float(runs[a][s][metric]) - float(runs[b][s][metric]) for s in seeds]
            mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
            half = float(student_t.ppf(0.975, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
            out.append({"pair": f"{a} - {b}", "metric": metric, "mean": mean, "low": mean - half,
                        "high": mean + half, "n": len(diffs), "diffs": diffs})
    return out


def add_before_refit_rows(runs: dict[str, dict[int, dict[str, Any]]]) -> None:
    """For each method whose runs recorded ``info["before_refit"]`` (:class:`BeforeRefit`), a row
    ``<method>_before_refit``: the same runs' accuracies just before the end-of-fit refit (same times)."""
    for name, per_seed in list(runs.items()):
        if per_seed and all("before_refit" in r["info"] for r in per_seed.values()):
            runs[f"{name}_before_refit"] = {
                seed: {**r["info"]["before_refit"], "train_seconds": r["train_seconds"],
                       "train_cpu_seconds": r["train_cpu_seconds"], "info": {"same_run_as": name}}
                for seed, r in per_seed.items()
            }


def plot(path: Path, summary: Mapping[str, Mapping[str, Any]]) -> None:
    plt = pyplot()
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(methods) + 2), 4))
    metrics = [("average", "average"), ("worst_decile", "worst 10% of groups"), ("worst_group", "worst group")]
    for i, (key, label) in enumerate(metrics):
        xs = [j + (i - 1) * 0.27 for j in range(len(methods))]
        ax.bar(
            xs,
            [100 * summary[m][key]["mean"] for m in methods],
            0.27,
            yerr=[100 * summary[m][key]["std"] for m in methods],
            capsize=3,
            label=label,
        )
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Coloured Fashion-MNIST: average vs worst-group accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    if args.merge:
        runs, descriptions, commits, sources = merge_runs(args.merge)
        add_before_refit_rows(runs)
        first = json.loads(Path(args.merge[0]).read_text())["config"]
        kept = {m: {str(k): v for k, v in sorted(per.items())} for m, per in sources.items()}
        return report(args, runs, descriptions, int(first["train_size_used"]), int(first["test_size_used"]),
                      {"merged_from": [str(p) for p in args.merge], "merged_commits": commits, "merged_sources": kept})
    share = args.synthetic_share
    overrides = {
        "jtt": make_jtt(args.jtt_epochs, args.jtt_upweight),
        "group_dro": make_group_dro(args.dro_step_size),
        "dfr": make_dfr(weight_decay=args.dfr_weight_decay),
        "ls_no_gan": make_ls_no_gan(share),
        "recolour_uniform": make_recolour_uniform(share),
        "ls_user_scenario": make_user_scenario(share),
        # The plugins' generic `lightning_synth` is replaced here by the worst-group headline (the GAN).
        "lightning_synth": make_lightning_synth(args.gan_steps, args.gan_width, args.gan_min_quality,
                                                args.gan_class_check, share, args.gan_slice, not args.no_refit),
    }
    methods = resolve_methods(args.methods or list(DEFAULT_METHODS), TASK, overrides)
    reference = make_datamodule(args)
    reference.setup("fit")
    assert reference.train_set is not None and reference.test_set is not None and reference.val_set is not None
    train_size = len(reference.train_set)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="worst-group-") as scratch:
        for method in methods:
            runs[method.name] = {}
            for seed in args.seeds:
                ctx = make_context(args, seed, train_size, Path(scratch) / f"{method.name}-{seed}")
                model, stats = run_method(method, ctx, make_datamodule(args))
                test, val = (
                    group_accuracy(model, reference.test_set),
                    group_accuracy(model, reference.val_set),
                )
                runs[method.name][seed] = {**test, "val": val, **stats, "info": ctx.info}
                print(
                    f"{method.name} seed {seed}: average {test['average']:.4f}, worst group "
                    f"{test['worst_group']:.4f} ({test['worst_group_name']}), {stats['train_seconds']:.1f}s"
                )
                if args.export_dir is not None and seed == args.seeds[0]:
                    export_torchscript(model, args.export_dir / f"{method.name}.pt")
    add_before_refit_rows(runs)
    return report(args, runs, {m.name: m.description for m in methods}, train_size, len(reference.test_set))


def merge_runs(paths: Sequence[Path]) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, str], list[str],
                                               dict[str, dict[int, str]]]:
    """The runs of several results files, pooled per method and seed: a later file's run of a method and seed
    replaces an earlier one (a re-run at another commit). Also the methods' descriptions, each file's
    ``commit``, and which file each kept run came from."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    sources: dict[str, dict[int, str]] = {}
    descriptions: dict[str, str] = {}
    commits = []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        commits.append(str(saved.get("commit", "unknown")))
        descriptions.update(saved.get("methods", {}))
        for name, per_seed in saved["runs"].items():
            if name.endswith("_before_refit"):
                continue  # rebuilt from the method's own runs
            for seed, run in per_seed.items():
                runs.setdefault(name, {})[int(seed)] = run
                sources.setdefault(name, {})[int(seed)] = str(path)
    return runs, descriptions, commits, sources


def report(
    args: argparse.Namespace, runs: dict[str, dict[int, dict[str, Any]]], descriptions: Mapping[str, str],
    train_size: int, test_size: int, extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the table and paired intervals of ``runs``; write ``worst_group.json`` and ``.png``."""
    summary = {
        name: {
            key: summarize([r[key] for r in per_seed.values()])
            for key in ("average", "worst_group", "worst_decile", "mean_group", "train_seconds", "train_cpu_seconds")
        }
        | {"val_worst_group": summarize([r["val"]["worst_group"] for r in per_seed.values()])}
        for name, per_seed in runs.items()
    }
    for name, per_seed in runs.items():
        summary[name]["val_worst_decile"] = summarize([r["val"]["worst_decile"] for r in per_seed.values()])
        summary[name]["extra_seconds"] = summarize([_extra_seconds(r["info"]) for r in per_seed.values()])
    rows = [
        [
            name,
            pm(s["average"]),
            pm(s["worst_group"]),
            pm(s["worst_decile"]),
            pm(s["val_worst_group"]),
            pm(s["val_worst_decile"]),
            f"{s['train_seconds']['mean']:.0f}",
            f"{s['extra_seconds']['mean']:.0f}",
        ]
        for name, s in summary.items()
    ]
    headers = ["method", "average %", "worst group %", "worst 10% groups %", "val worst group %",
               "val worst 10% %", "train s", "extra s"]
    print(format_table(headers, rows))
    paired = paired_differences(runs, PAIRS)
    if paired:
        print(format_table(
            ["pair", "metric", "mean diff (pts)", "95% CI (pts)", "seeds"],
            [[p["pair"], p["metric"], f"{100 * p['mean']:+.1f}", f"[{100 * p['low']:+.1f}, {100 * p['high']:+.1f}]",
              str(p["n"])] for p in paired],
        ))
    payload = {
        "benchmark": TASK,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {
            "train_size_used": train_size,
            "test_size_used": test_size,
            "max_steps": make_context(args, 0, train_size, Path()).max_steps,
            "num_groups": LAYOUT.num_groups,
        } | dict(extra_config or {}),
        "methods": dict(descriptions),
        "summary": summary,
        "paired": paired,
        "runs": runs,
    }
    write_json(args.results_dir / f"{TASK}.json", payload)
    plot(args.results_dir / f"{TASK}.png", summary)
    return payload


if __name__ == "__main__":
    main()

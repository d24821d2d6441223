"""`ConditionalGAN`: a small DCGAN-style GAN conditioned on class, a weakness category and a data slice.

A category is ``"clean"`` or the name of a perturbation in the shared bank. While training, each real
image gets a random category and severity; a perturbed category means the real image is perturbed with
that bank operation before the discriminator sees it, so ``G(z, class, category, severity)`` learns to
draw images of the class that *show* the perturbation.

A slice is an integer attribute of the real samples (``num_slices > 0``; read from the batch's slices under
``slice_key`` through the batch adapter, e.g. the group of ``(x, y, group)`` batches). Class, category and
slice have *separate* embeddings, so a (class, slice) cell that is rare or absent in training can still be
asked for; the GAN counts the (class, slice) cells it was trained on in :attr:`ConditionalGAN.cell_counts`.

The networks and their losses are in :mod:`lightning_synth.generators.gan_networks`.

Under DDP, train it with ``Trainer.fit`` (it is a LightningModule): the strategy gives each rank its shard of
the batches and averages the gradients, so the ranks hold one model, not N copies. :meth:`ConditionalGAN.sample`
makes the same images on every rank only when given generators in the same state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Adam, Optimizer
from typing_extensions import override

from lightning_synth._validation import check_int
from lightning_synth.batch import BatchAdapter, resolve_batch_adapter
from lightning_synth.generators.gan_conditions import (
    CLEAN,
    _check_categories,
    _describe,
    check_conditions,
    check_images,
    check_slices,
    check_training_weights,
)
from lightning_synth.generators.gan_conditions import _check_float as _check_float  # old path
from lightning_synth.generators.gan_conditions import _is_number as _is_number  # old path
from lightning_synth.generators.gan_networks import _ConditionalBatchNorm as _ConditionalBatchNorm  # old path
from lightning_synth.generators.gan_networks import (
    _Discriminator,
    _eval_mode,
    _Generator,
    make_junk,
    margin_hinge,
    mode_seeking_loss,
    task_adversarial_loss,
)
from lightning_synth.perturbations import PerturbationBank, default_bank

__all__ = ["CLEAN", "ConditionalGAN", "make_junk", "margin_hinge", "mode_seeking_loss"]


class ConditionalGAN(L.LightningModule):
    """A DCGAN-style GAN conditioned on class and weakness category, trained with manual optimization.

    Args:
        latent_dim: size of the noise vector (and of the condition embeddings).
        num_classes: number of classes of the task.
        categories: weakness categories: ``"clean"`` plus names of registered perturbations
            (default: ``"clean"`` and the built-in bank's nine).
        image_size: height = width of the images (>= 4); 28 for Fashion-MNIST, 8 for digits.
        channels: image channels (1 or 3 usually).
        width: base number of convolution channels of both networks.
        lr: Adam learning rate of both networks.
        betas: Adam betas.
        aux_weight: weight of the auxiliary class/category loss (0 turns the AC-GAN head off).
        diversity_weight: weight of the mode-seeking term that keeps samples of one condition diverse.
        junk_fraction: junk images shown to the discriminator as fake per real image (0 turns it off).
        adversarial_weight: weight of the task-adversarial term (0: off); needs :meth:`set_task_model`.
        adversarial_margin: the task model's logit margin (true class minus best other) at which the
            adversarial term stops, so that labels do not flip. It holds for training batches; samples
            scatter around it, so leave headroom (margin 1 flipped many Fashion-MNIST samples, 3 did not).
        batch_adapter: how to read ``(images, labels)`` from a batch (default: tuples, lists, dicts).
        num_slices: values of the slice attribute (integers in ``[0, num_slices)``); 0: no slice condition.
        slice_key: the name of the slice attribute in a batch's slices (``(x, y, group)`` batches: ``"group"``).

    Attributes:
        cell_counts: ``(num_classes, max(num_slices, 1))`` real training samples seen per (class, slice) cell
            (a persistent buffer: it is saved with the weights).

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range or a category is unknown.

    Shape:
        - batches: images ``(B, channels, image_size, image_size)`` in [0, 1], labels ``(B,)`` int.

    Example:
        >>> gan = ConditionalGAN(latent_dim=8, num_classes=10, image_size=8, width=8)
        >>> g = torch.Generator().manual_seed(0)
        >>> rotation = torch.full((4,), gan.category_index("rotation"))
        >>> images = gan.sample(torch.tensor([0, 1, 2, 3]), rotation, generator=g)
        >>> tuple(images.shape), bool(images.min() >= 0), bool(images.max() <= 1)
        ((4, 1, 8, 8), True, True)
        >>> tuple(gan.realism(images, torch.tensor([0, 1, 2, 3]), rotation).shape)
        (4,)
        >>> sliced = ConditionalGAN(latent_dim=8, num_classes=10, categories=["clean"], image_size=8, width=8,
        ...                         channels=3, num_slices=4)
        >>> images = sliced.sample(torch.tensor([0, 1]), torch.tensor([0, 0]), slices=torch.tensor([3, 2]))
        >>> tuple(images.shape), tuple(sliced.classify(images).shape)
        ((2, 3, 8, 8), (2, 10))
    """

    def __init__(
        self,
        latent_dim: int = 64,
        num_classes: int = 10,
        categories: Sequence[str] | None = None,
        image_size: int = 28,
        channels: int = 1,
        width: int = 32,
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        aux_weight: float = 1.0,
        diversity_weight: float = 0.03,
        junk_fraction: float = 0.25,
        adversarial_weight: float = 0.0,
        adversarial_margin: float = 3.0,
        batch_adapter: BatchAdapter | Callable[[Any], Any] | None = None,
        num_slices: int = 0,
        slice_key: str = "group",
    ) -> None:
        super().__init__()
        categories = [CLEAN, *default_bank().names] if categories is None else categories
        check_int("latent_dim", latent_dim, 1)
        check_int("num_classes", num_classes, 2)
        check_int("image_size", image_size, 4)
        check_int("channels", channels, 1)
        check_int("width", width, 1)
        check_int("num_slices", num_slices, 0)
        if not isinstance(slice_key, str) or not slice_key:
            raise TypeError(f"`slice_key` must be a non-empty string, got {_describe(slice_key)}")
        self.categories: list[str] = _check_categories(categories)
        check_training_weights(lr, betas, aux_weight, diversity_weight, junk_fraction, adversarial_weight,
                               adversarial_margin)
        self.save_hyperparameters(ignore=["batch_adapter"])
        self.hparams["categories"] = list(self.categories)  # `None` would not say which
        self.automatic_optimization = False
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.image_size, self.channels = image_size, channels
        self.lr, self.betas = float(lr), (float(betas[0]), float(betas[1]))
        self.aux_weight, self.adversarial_weight = float(aux_weight), float(adversarial_weight)
        self.adversarial_margin, self.diversity_weight = float(adversarial_margin), float(diversity_weight)
        self.junk_fraction = float(junk_fraction)
        self.num_slices, self.slice_key = num_slices, slice_key
        self.cell_counts: Tensor
        self.register_buffer("cell_counts", torch.zeros(num_classes, max(num_slices, 1)))
        self.batch_adapter = resolve_batch_adapter(batch_adapter)
        self.bank = PerturbationBank([c for c in self.categories if c != CLEAN])
        self.clean_index = self.categories.index(CLEAN)
        top = [0.0 if c == CLEAN else float(self.bank[c].max_severity) for c in self.categories]
        self._top_severity: Tensor
        self.register_buffer("_top_severity", torch.tensor(top), persistent=False)
        self.generator = _Generator(
            latent_dim, num_classes, len(self.categories), image_size, channels, width, num_slices
        )
        self.discriminator = _Discriminator(
            num_classes, len(self.categories), image_size, channels, width, num_slices
        )
        # The task model is held outside the module tree: it is not ours to save, move, or wrap in DDP.
        self._task_model: tuple[nn.Module, ...] = ()

    # ----------------------------------------------------------------------------------------- public API
    @property
    def task_model(self) -> nn.Module | None:
        return self._task_model[0] if self._task_model else None

    def set_task_model(self, model: nn.Module | None) -> None:
        """Use ``model`` (logits ``(B, num_classes)`` from images) for the adversarial term; ``None`` clears."""
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module or None, got {type(model).__name__}")
        self._task_model = (model,) if model is not None else ()

    def category_index(self, name: str) -> int:
        """Index of category ``name`` (``"clean"`` or a perturbation name)."""
        if name not in self.categories:
            raise KeyError(f"No category {name!r}; this GAN has {self.categories}")
        return self.categories.index(name)

    def max_severity(self, category: int) -> float:
        """Top severity of a category's perturbation (0 for ``"clean"``)."""
        return float(self._top_severity[category])

    @override
    def forward(
        self, z: Tensor, classes: Tensor, categories: Tensor, severities: Tensor, slices: Tensor | None = None
    ) -> Tensor:
        """Images in [0, 1] from noise ``(B, latent_dim)`` and conditions ``(B,)`` each (slices: default 0)."""
        slices = self._slices(slices, len(classes))
        return self.generator(z, classes, categories, self._codes(categories, severities), slices)

    @torch.no_grad()
    def sample(
        self,
        classes: Tensor,
        categories: Tensor,
        generator: torch.Generator | None = None,
        severities: float | Tensor | None = None,
        slices: Tensor | None = None,
    ) -> Tensor:
        """Draw one image per ``(class, category[, slice])`` condition (generator in eval mode).

        Args:
            classes: ``(N,)`` class indices.
            categories: ``(N,)`` category indices (see :meth:`category_index`).
            generator: a CPU RNG for the noise; same seed, same images.
            severities: per-sample severities ``(N,)`` or one for all; default: the middle of each
                perturbation's ladder. Ignored for ``"clean"``.
            slices: ``(N,)`` slice values (GANs built with ``num_slices > 0``); default 0.

        Returns:
            ``(N, channels, image_size, image_size)`` images in [0, 1], on the GAN's device.
        """
        classes, categories = self._check_conditions(classes, categories)
        sev = self._severities(categories, severities)
        z = torch.randn(len(classes), self.latent_dim, generator=generator).to(self.device)
        with _eval_mode(self.generator):
            return self(z, classes, categories, sev, slices)

    @torch.no_grad()
    def realism(
        self, images: Tensor, classes: Tensor, categories: Tensor, severities: float | Tensor | None = None,
        slices: Tensor | None = None,
    ) -> Tensor:
        """Discriminator's probability ``(N,)`` in [0, 1] that each image is a real one of its conditions."""
        classes, categories = self._check_conditions(classes, categories)
        self._check_images(images, len(classes))
        sev = self._severities(categories, severities)
        codes, slices = self._codes(categories, sev), self._slices(slices, len(classes))
        with _eval_mode(self.discriminator):
            logits, _ = self.discriminator(images.to(self.device), classes, categories, codes, slices)
        return torch.sigmoid(logits)

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` of the discriminator's auxiliary head (trained on real images only).

        A class check independent of the task model: on the slices the task model gets wrong, the task model
        would reject exactly the samples that are needed.
        """
        self._check_images(images, len(images))
        with _eval_mode(self.discriminator):
            h = self.discriminator.features(images.to(self.device) * 2 - 1)
            return self.discriminator.aux(h)[:, : self.num_classes]

    def perturb_randomly(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """What the discriminator is shown as real: each image under a random category and severity.

        Categories are uniform; a perturbation's severity is uniform in ``[1, its max severity]``.

        Returns:
            ``(perturbed images, categories (N,), severities (N,))``, severity 0 for ``"clean"``.
        """
        n = len(images)
        categories = torch.randint(len(self.categories), (n,), generator=generator)
        top = self._top_severity.cpu()[categories]
        severities = 1.0 + torch.rand(n, generator=generator) * (top - 1.0).clamp(min=0.0)
        severities = torch.where(categories == self.clean_index, 0.0, severities)
        out = images.clone()
        for k, name in enumerate(self.categories):
            mask = (categories == k).to(images.device)
            if k != self.clean_index and bool(mask.any()):
                out[mask] = self.bank[name](images[mask], severities[mask.cpu()], generator).to(out.dtype)
        return out, categories.to(images.device), severities.to(images.device)

    def fit_steps(
        self,
        images: Tensor,
        labels: Tensor,
        steps: int,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
        optimizers: Sequence[Optimizer] | None = None,
        slices: Tensor | None = None,
    ) -> list[Optimizer]:
        """Train ``steps`` steps on in-memory data without a Trainer; deterministic given ``generator``.

        ``slices`` ``(N,)``: the slice value of every image (needed when ``num_slices > 0``).

        Batches are drawn with replacement from ``images``/``labels`` with ``generator``, so processes that
        share the data and the RNG state end with identical weights (no gradient sync needed).

        Returns:
            The ``[discriminator, generator]`` optimizers (pass them back in to keep Adam's state).
        """
        check_int("steps", steps, 0)
        check_int("batch_size", batch_size, 1)
        self._check_images(images, len(labels))
        if self.num_slices > 0 and (slices is None or len(slices) != len(labels)):
            raise ValueError(f"This GAN is conditioned on {self.num_slices} slices: pass `slices` with one value "
                             f"per image ({len(labels)}), got {_describe(slices)}")
        opts = list(optimizers) if optimizers is not None else self.configure_optimizers()
        was_training = self.training
        self.train()
        try:
            for _ in range(steps):
                idx = torch.randint(len(labels), (batch_size,), generator=generator)
                batch_slices = slices[idx].to(self.device) if slices is not None else None
                self._step(images[idx].to(self.device), labels[idx].to(self.device), batch_slices, opts,
                           Tensor.backward, generator)
        finally:
            self.train(was_training)
        return opts

    # ------------------------------------------------------------------------------------ Lightning hooks
    @override
    def configure_optimizers(self) -> list[Optimizer]:
        return [Adam(self.discriminator.parameters(), lr=self.lr, betas=self.betas),
                Adam(self.generator.parameters(), lr=self.lr, betas=self.betas)]

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        view = self.batch_adapter.unpack(batch)
        self._check_images(view.inputs, len(view.targets))
        slices = None
        if self.num_slices > 0:
            if self.slice_key not in view.slices:
                raise KeyError(f"This GAN is conditioned on slice {self.slice_key!r}, but the batch has slices "
                               f"{sorted(view.slices)}; yield (x, y, {{{self.slice_key!r}: values}}) batches.")
            slices = view.slices[self.slice_key].long()
        optimizers = self.optimizers()
        assert isinstance(optimizers, list)  # configure_optimizers returns two
        losses = self._step(view.inputs, view.targets, slices, optimizers, self.manual_backward, None)
        self.log_dict({f"gan/{k}": v for k, v in losses.items()}, batch_size=len(view.targets))

    # ---------------------------------------------------------------------------------------- internals
    def _step(
        self,
        images: Tensor,
        labels: Tensor,
        slices: Tensor | None,
        optimizers: Sequence[Any],
        backward: Callable[..., Any],
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        opt_d, opt_g = optimizers
        slices = self._slices(slices, len(labels))
        with torch.no_grad():
            self.cell_counts.index_put_((labels, slices), torch.ones_like(labels, dtype=self.cell_counts.dtype),
                                        accumulate=True)
        real, categories, severities = self.perturb_randomly(images, generator)
        codes = self._codes(categories, severities)
        # Fakes come in pairs (i, i + half) that share their conditions, for the mode-seeking term.
        pair = torch.arange(len(labels), device=self.device) % ((len(labels) + 1) // 2)
        conditions = (labels[pair], categories[pair], codes[pair], slices[pair])
        z = torch.randn(len(labels), self.latent_dim, generator=generator).to(self.device)
        fake = self.generator(z, *conditions)
        # Under DDP without unused-parameter detection every backward must reach every parameter.
        full_graph = self._ddp_needs_full_graph()

        real_logit, real_aux = self.discriminator(real, labels, categories, codes, slices)
        fake_logit, _ = self.discriminator(fake if full_graph else fake.detach(), *conditions)
        junk = make_junk(images, math.ceil(self.junk_fraction * len(labels)), generator)
        n = len(junk)
        junk_logit, _ = self.discriminator(junk, labels[:n], categories[:n], codes[:n], slices[:n])
        loss_d = (
            F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(torch.cat([fake_logit, junk_logit]),
                                                 torch.zeros(len(fake_logit) + len(junk_logit), device=self.device))
            + self.aux_weight * self._aux_loss(real_aux, labels, categories, slices)
        )
        opt_d.zero_grad()
        backward(loss_d, **({"retain_graph": True} if full_graph else {}))  # G's graph is reused below
        opt_d.step()

        loss_g = self._generator_loss(fake, z, *conditions, freeze_d=not full_graph)
        opt_g.zero_grad()
        backward(loss_g["loss_g"])
        opt_g.step()
        return {"loss_d": loss_d.detach(), **{k: v.detach() for k, v in loss_g.items()}}

    def _generator_loss(
        self, fake: Tensor, z: Tensor, labels: Tensor, categories: Tensor, codes: Tensor, slices: Tensor,
        freeze_d: bool,
    ) -> dict[str, Tensor]:
        self.discriminator.requires_grad_(not freeze_d)
        try:
            logit, aux = self.discriminator(fake, labels, categories, codes, slices)
        finally:
            self.discriminator.requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        loss = loss + self.aux_weight * self._aux_loss(aux, labels, categories, slices)
        out = {"mode_seeking": mode_seeking_loss(fake, z)}
        loss = loss + self.diversity_weight * out["mode_seeking"]
        if self.adversarial_weight > 0 and self.task_model is not None:
            out["adversarial"] = self._adversarial_loss(fake, labels)
            loss = loss + self.adversarial_weight * out["adversarial"]
        return {"loss_g": loss, **out}

    def _adversarial_loss(self, fake: Tensor, labels: Tensor) -> Tensor:
        assert self.task_model is not None
        return task_adversarial_loss(self.task_model, fake, labels, self.adversarial_margin)

    def _aux_loss(self, aux: Tensor, labels: Tensor, categories: Tensor, slices: Tensor) -> Tensor:
        num_classes, num_categories = self.num_classes, len(self.categories)
        loss = F.cross_entropy(aux[:, :num_classes], labels)
        loss = loss + F.cross_entropy(aux[:, num_classes : num_classes + num_categories], categories)
        if self.num_slices > 0:
            loss = loss + F.cross_entropy(aux[:, num_classes + num_categories :], slices)
        return loss

    def _slices(self, slices: Tensor | None, n: int) -> Tensor:
        """Checked slice values ``(n,)`` on the GAN's device; zeros when ``None``."""
        if slices is None:
            return torch.zeros(n, dtype=torch.long, device=self.device)
        check_slices(slices, n, self.num_slices)
        return slices.long().to(self.device)

    def _severities(self, categories: Tensor, severities: float | Tensor | None) -> Tensor:
        top = self._top_severity[categories]
        if severities is None:
            sev = (1.0 + top) / 2
        else:
            sev = torch.as_tensor(severities, dtype=torch.float32, device=self.device).expand(len(categories))
            if bool(((sev < 0) | ((sev > top) & (top > 0))).any()):
                raise ValueError(f"`severities` must be in [0, max severity of the category], got {severities}")
        return torch.where(categories == self.clean_index, 0.0, sev)

    def _codes(self, categories: Tensor, severities: Tensor) -> Tensor:
        return severities.float() / self._top_severity.to(severities.device)[categories].clamp(min=1.0)

    def _check_conditions(self, classes: Tensor, categories: Tensor) -> tuple[Tensor, Tensor]:
        check_conditions(classes, categories, self.num_classes, len(self.categories))
        return classes.long().to(self.device), categories.long().to(self.device)

    def _check_images(self, images: Tensor, n: int) -> None:
        check_images(images, n, self.channels, self.image_size)

    def _ddp_needs_full_graph(self) -> bool:
        if self._trainer is None:
            return False
        model = self.trainer.strategy.model
        return isinstance(model, DistributedDataParallel) and not model.find_unused_parameters

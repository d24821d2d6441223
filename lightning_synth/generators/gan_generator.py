"""`ConditionalGANGenerator`: samples from a `ConditionalGAN` aimed at where the weakness profile says the model fails.

Each sample targets one weakness, drawn in proportion to its gap:

- a slice weakness ``<slice_key>=<v>`` (a GAN built with ``num_slices > 0``) gives samples of the weak
  (class, slice) cells: slice ``v`` with the classes the GAN saw in that slice (in proportion to its
  :attr:`~ConditionalGAN.cell_counts`; every class if it saw none, composing the cell from the separate
  class and slice embeddings);
- a slice weakness on another attribute ``<name>=<v>`` gives samples of the cell that ``slice_cells[name]``
  maps ``v`` to (see :func:`cells_from_data`: e.g. the analyzer reports weak *groups* while the GAN is
  conditioned on the *colour* attribute, shared by ten groups, so that each colour embedding learns from ten
  times the samples);
- a class or confusion weakness gives a clean sample of its class (with a slice drawn from the class's cells);
- a perturbation weakness gives a sample of the GAN's matching category at the weakness's severity, with a
  uniformly drawn class.

With no usable weakness, samples are clean and of uniform class. Two filters drop samples, and more are
drawn (up to ``max_rounds`` times) so that about ``budget`` survive: the discriminator's realism under
``min_quality``, and a class check (``class_check``): the discriminator's auxiliary class head (trained on
real images only) or the task model must predict the conditioned class.

Sampling randomness comes from ``context.generator``, which the engine seeds per rank: under DDP the ranks
make *different* samples (then gathered), from the same GAN weights. In-loop training (``train_steps > 0``)
draws its batches from an RNG seeded by the epoch and a call counter, not by the rank, on the same real
cache: every rank runs the same steps and ends with the same weights without communication (the work is
repeated on each rank, not spread; a rank that gets no share of a refresh skips its call and falls out of
step). To spread GAN training over ranks, pretrain the :class:`ConditionalGAN` with ``Trainer.fit`` under
DDP, where the strategy shards the batches and averages the gradients, and keep ``train_steps=0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_synth._validation import check_choice
from lightning_synth.generators.base import GenerationContext, SyntheticBatch, SyntheticGenerator
from lightning_synth.generators.gan import ConditionalGAN
from lightning_synth.profile import Weakness, WeaknessProfile

__all__ = ["ConditionalGANGenerator", "cells_from_data"]

_CHUNK = 1024
_CLASS_CHECKS = ("auxiliary", "task", "none")


def cells_from_data(values: Tensor, labels: Tensor, slices: Tensor, num_values: int) -> Tensor:
    """For each value of an attribute, the (class, slice) cell most of its samples fall in.

    Args:
        values: ``(N,)`` the attribute's integer values (e.g. group labels) of real samples.
        labels: ``(N,)`` their classes.
        slices: ``(N,)`` their values of the GAN's slice attribute.
        num_values: how many values the attribute has.

    Returns:
        ``(num_values, 2)`` long tensor of ``(class, slice)``; ``(-1, -1)`` for values no sample has.

    Example:
        >>> groups = torch.tensor([7, 7, 12]); labels = torch.tensor([0, 0, 1]); colours = torch.tensor([7, 7, 2])
        >>> cells_from_data(groups, labels, colours, 13)[[7, 12, 0]].tolist()
        [[0, 7], [1, 2], [-1, -1]]
    """
    out = torch.full((num_values, 2), -1, dtype=torch.long)
    pairs = torch.stack([labels.long(), slices.long()], 1)
    for v in values.unique().tolist():
        if 0 <= v < num_values:
            cells, counts = pairs[values == v].unique(dim=0, return_counts=True)
            out[v] = cells[counts.argmax()]
    return out


@dataclass(frozen=True)
class _Target:
    """What one kind of sample is aimed at: a weakness key (``""``: none, the key becomes ``class/<c>``), a
    fixed class (``None``: uniform), a category, a severity and a slice value."""

    key: str
    weight: float
    category: int
    cls: int | None = None
    severity: float = 0.0
    slice: int | None = None  # None: drawn from the class's cells


class ConditionalGANGenerator(SyntheticGenerator):
    """Generate class- and perturbation-targeted samples with a :class:`ConditionalGAN`.

    Args:
        gan: the GAN (trained beforehand, or in the loop with ``train_steps``).
        min_quality: samples whose realism score is below this are dropped (0 keeps all).
        oversample: how many candidates to draw per wanted sample in the first round (>= 1).
        max_rounds: rounds of drawing before giving up on filling the budget.
        train_steps: GAN training steps on ``context.real_inputs`` before each :meth:`generate` (0: none).
        batch_size: batch size of those steps.
        class_check: ``"auxiliary"``: keep samples whose class the discriminator's auxiliary head predicts;
            ``"task"``: that ``context.task_model`` predicts (it rejects what the model gets wrong, which on
            weak slices is what is needed); ``"none"`` (default): no check. A GAN that is still learning its
            classes fails the auxiliary check often, so that fewer than ``budget`` samples come back.
        slice_cells: per slice attribute other than the GAN's, a ``(num_values, 2)`` table of the
            ``(class, GAN slice)`` cell of each value (:func:`cells_from_data` derives it from real samples).

    Raises:
        TypeError: if ``gan`` is not a :class:`ConditionalGAN` or a number has the wrong type.
        ValueError: if a number is out of range.

    Example:
        >>> from lightning_synth.profile import Weakness, WeaknessProfile
        >>> gan = ConditionalGAN(latent_dim=8, image_size=8, width=8)
        >>> profile = WeaknessProfile(weaknesses=[
        ...     Weakness(kind="class", name="6", error_rate=0.3, gap=0.2, support=10, target=6)])
        >>> context = GenerationContext(torch.rand(16, 1, 8, 8), torch.arange(16) % 10, 10,
        ...                             torch.Generator().manual_seed(0))
        >>> batch = ConditionalGANGenerator(gan).generate(profile, 4, context)
        >>> batch.targets.tolist(), batch.weakness[0]
        ([6, 6, 6, 6], 'class/6')
    """

    name = "gan"

    def __init__(
        self,
        gan: ConditionalGAN,
        min_quality: float = 0.0,
        oversample: float = 1.5,
        max_rounds: int = 4,
        train_steps: int = 0,
        batch_size: int = 64,
        class_check: str = "none",
        slice_cells: dict[str, Tensor] | None = None,
    ) -> None:
        if not isinstance(gan, ConditionalGAN):
            raise TypeError(f"`gan` must be a ConditionalGAN, got {type(gan).__name__}")
        for name, value, low, high in (("min_quality", min_quality, 0.0, 1.0), ("oversample", oversample, 1.0, 1e6)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be a float, got {type(value).__name__}: {value!r}")
            if not low <= value <= high:  # also false for NaN
                raise ValueError(f"`{name}` must be in [{low:g}, {high:g}], got {value}")
        for name, value, low in (("max_rounds", max_rounds, 1), ("train_steps", train_steps, 0),
                                 ("batch_size", batch_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}: {value!r}")
            if value < low:
                raise ValueError(f"`{name}` must be >= {low}, got {value}")
        check_choice("class_check", class_check, _CLASS_CHECKS)
        self.gan, self.class_check = gan, class_check
        self.slice_cells = {str(k): torch.as_tensor(v).long() for k, v in (slice_cells or {}).items()}
        for name, table in self.slice_cells.items():
            if table.ndim != 2 or table.shape[1] != 2:
                raise ValueError(f"`slice_cells[{name!r}]` must have shape (num_values, 2), got {tuple(table.shape)}")
        self.min_quality, self.oversample, self.max_rounds = float(min_quality), float(oversample), max_rounds
        self.train_steps, self.batch_size = train_steps, batch_size
        self._optimizers: list[torch.optim.Optimizer] | None = None
        self._train_calls = 0
        self._pending_optimizer_state: list[dict[str, Any]] | None = None

    def generate(self, profile: WeaknessProfile, budget: int, context: GenerationContext) -> SyntheticBatch:
        """Up to ``budget`` samples aimed at ``profile`` (CPU tensors); see the module docstring."""
        if budget < 0:
            raise ValueError(f"`budget` must be >= 0, got {budget}")
        num_classes = self.gan.num_classes
        if context.num_classes != num_classes:
            raise ValueError(f"The task has {context.num_classes} classes but the GAN was built with "
                             f"`num_classes={num_classes}`; build the GAN with the task's class count.")
        self._move_to(context.device)
        if self.train_steps > 0:
            self._train(context)
        if budget == 0:
            return SyntheticBatch.empty(self.name, self._empty_images())
        targets = self._plan(profile) or [_Target("", 1.0, self.gan.clean_index)]  # none: clean, any class
        inputs, labels, quality = [], [], []
        keys: list[str] = []
        kept, pass_rate = 0, 1.0
        for _ in range(self.max_rounds):
            n = math.ceil((budget - kept) * self.oversample / max(pass_rate, 0.05))
            images, classes, round_keys, scores = self._draw(targets, n, context.generator)
            ok = (scores >= self.min_quality) & self._class_kept(images, classes, context)
            pass_rate = max(float(ok.float().mean()), 1.0 / n)
            keep = ok.nonzero().squeeze(1)[: budget - kept]
            inputs.append(images[keep])
            labels.append(classes[keep])
            keys.extend(round_keys[i] for i in keep.tolist())
            quality.append(scores[keep])
            kept += len(keep)
            if kept >= budget:
                break
        return SyntheticBatch(torch.cat(inputs), torch.cat(labels), keys, torch.cat(quality), self.name)

    def state_dict(self) -> dict[str, Any]:
        opts = self._optimizers
        optimizer_state = [o.state_dict() for o in opts] if opts is not None else self._pending_optimizer_state
        return {"gan": self.gan.state_dict(), "optimizers": optimizer_state, "train_calls": self._train_calls}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.gan.load_state_dict(state_dict["gan"])
        self._optimizers = None
        self._pending_optimizer_state = state_dict.get("optimizers")
        self._train_calls = int(state_dict.get("train_calls", 0))

    # ---------------------------------------------------------------------------------------- internals
    def _plan(self, profile: WeaknessProfile) -> list[_Target]:
        """The weaknesses this generator can target, with their sampling weights (the positive gaps)."""
        num_classes = self.gan.num_classes
        targets = []
        for w in profile.by_kind(("class", "confusion", "perturbation", "slice")):
            if w.gap <= 0:
                continue
            if w.kind == "slice":
                targets.extend(self._slice_targets(w))
            elif w.kind != "perturbation" and w.target is not None and 0 <= w.target < num_classes:
                targets.append(_Target(w.key, w.gap, self.gan.clean_index, cls=w.target))
            elif w.kind == "perturbation" and w.name in self.gan.categories:
                targets.append(_Target(w.key, w.gap, self.gan.category_index(w.name),
                                       severity=self._severity(w)))
        return targets

    def _slice_targets(self, weakness: Weakness) -> list[_Target]:
        """The (class, slice) cells of a slice weakness ``<slice_key>=<value>``; none for other attributes."""
        gan = self.gan
        key, _, value = weakness.name.partition("=")
        if gan.num_slices == 0 or not value.lstrip("-").isdigit():
            return []
        v = int(value)
        if key != gan.slice_key:
            table = self.slice_cells.get(key)
            if table is None or not 0 <= v < len(table):
                return []
            c, s = (int(x) for x in table[v])
            if not (0 <= c < gan.num_classes and 0 <= s < gan.num_slices):
                return []
            return [_Target(weakness.key, weakness.gap, gan.clean_index, cls=c, slice=s)]
        if not 0 <= v < gan.num_slices:
            return []
        counts = gan.cell_counts[:, v].detach().double().cpu()
        if float(counts.sum()) <= 0:
            counts = torch.ones_like(counts)  # an unseen slice: compose it with every class
        shares = counts / counts.sum()
        return [_Target(weakness.key, weakness.gap * float(shares[c]), gan.clean_index, cls=c, slice=v)
                for c in shares.nonzero().squeeze(1).tolist()]

    def _class_kept(self, images: Tensor, classes: Tensor, context: GenerationContext) -> Tensor:
        if self.class_check == "none" or (self.class_check == "task" and context.task_model is None):
            return torch.ones(len(classes), dtype=torch.bool)
        preds = []
        for part in images.split(_CHUNK):
            if self.class_check == "auxiliary":
                logits = self.gan.classify(part)
            else:
                model = context.task_model
                assert model is not None
                with torch.no_grad():
                    logits = model(part.to(context.device))
            preds.append(logits.argmax(1).cpu())
        return torch.cat(preds) == classes

    def _train(self, context: GenerationContext) -> None:
        if context.task_model is not None:
            self.gan.set_task_model(context.task_model)
        if self._optimizers is None:
            # Built lazily, after the GAN is on its device, so that Adam's state lives beside the weights.
            self._optimizers = self.gan.configure_optimizers()
            for opt, state in zip(self._optimizers, self._pending_optimizer_state or []):
                opt.load_state_dict(state)
            self._pending_optimizer_state = None
        slices = None
        if self.gan.num_slices > 0:
            slices = context.extras.get("slices", {}).get(self.gan.slice_key)
            if slices is None:
                raise KeyError(f"The GAN is conditioned on slice {self.gan.slice_key!r}: training it needs the real "
                               f"samples' values in `context.extras['slices'][{self.gan.slice_key!r}]`")
        # Rank-independent: every rank takes the same steps (see the module docstring).
        rng = torch.Generator().manual_seed(1_000_003 * context.epoch + self._train_calls)
        self._train_calls += 1
        self._optimizers = self.gan.fit_steps(
            context.real_inputs, context.real_targets, self.train_steps, self.batch_size,
            generator=rng, optimizers=self._optimizers, slices=slices,
        )

    def _move_to(self, device: torch.device) -> None:
        if self._optimizers is not None and self.gan.device != torch.device(device):
            # Adam's state does not follow `.to()`; reloading it casts it to the weights' new device.
            self._pending_optimizer_state = [o.state_dict() for o in self._optimizers]
            self._optimizers = None
        self.gan.to(device)

    def _draw(
        self, targets: list[_Target], n: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, list[str], Tensor]:
        weights = torch.tensor([t.weight for t in targets], dtype=torch.float64)
        picked = [targets[i] for i in torch.multinomial(weights, n, replacement=True, generator=generator).tolist()]
        uniform = torch.randint(self.gan.num_classes, (n,), generator=generator).tolist()
        classes = torch.tensor([u if t.cls is None else t.cls for t, u in zip(picked, uniform)], dtype=torch.long)
        categories = torch.tensor([t.category for t in picked])
        severities = torch.tensor([t.severity for t in picked])
        keys = [t.key or f"class/{c}" for t, c in zip(picked, classes.tolist())]
        slices = None
        if self.gan.num_slices > 0:  # a slice per sample: the target's, else one of its class's cells
            rows = self.gan.cell_counts.detach().double().cpu()[classes] + 1e-6
            drawn = torch.multinomial(rows, 1, generator=generator).squeeze(1)
            fixed = torch.tensor([-1 if t.slice is None else t.slice for t in picked])
            slices = torch.where(fixed >= 0, fixed, drawn)
        images, scores = [], []
        for part in torch.arange(n).split(_CHUNK):  # bounded memory whatever the budget
            c, k, s = classes[part], categories[part], severities[part]
            sl = slices[part] if slices is not None else None
            x = self.gan.sample(c, k, generator=generator, severities=s, slices=sl)
            scores.append(self.gan.realism(x, c, k, s, slices=sl).cpu())
            images.append(x.cpu())
        return torch.cat(images), classes, keys, torch.cat(scores)

    def _severity(self, weakness: Weakness) -> float:
        top = self.gan.max_severity(self.gan.category_index(weakness.name))
        return top if weakness.severity is None else min(max(float(weakness.severity), 0.0), top)

    def _empty_images(self) -> Tensor:
        size, channels = self.gan.image_size, self.gan.channels
        return torch.zeros(0, channels, size, size)

"""Consistency training on views aimed at the model's weaknesses: mixing chains and a Jensen-Shannon loss.

:class:`MixingChains` makes AugMix-style views of a real batch on the fly: each view is a per-sample
convex mix (Dirichlet weights) of ``width`` short chains of the perturbation bank's operations, blended
with the original by a Beta weight. Operations are drawn from a distribution that a Group-DRO-style
exponentiated update tilts towards the perturbations the latest
:class:`~lightning_synth.profile.WeaknessProfile` finds weak, with a uniform floor so that diversity is
kept. Added to the Trainer as a callback, it reads the profile of the
:class:`~lightning_synth.callbacks.FailureModeCallback` it was given at every training epoch start.

:func:`jsd_consistency` pulls the predictions on the views towards the prediction on the clean image
(AugMix's Jensen-Shannon term; cross-entropy stays on the clean image). Two lines in a ``training_step``::

    logits = self(torch.cat([x, *self.views(x)])).chunk(1 + self.views.num_views)
    loss = F.cross_entropy(logits[0], y) + 12.0 * jsd_consistency(*logits)

Cost: ``1 + num_views`` forward and backward passes per batch (3 with the default two views).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_synth._validation import check_int
from lightning_synth.callbacks.failure_mode import FailureModeCallback
from lightning_synth.perturbations import PerturbationBank
from lightning_synth.profile import WeaknessProfile

__all__ = ["MixingChains", "jsd_consistency"]


def jsd_consistency(*logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence between the softmax predictions of two or more views (AugMix, timm).

    ``mean_i KL(p_i || m)`` with ``m`` the mean of the ``p_i``, averaged over the batch. Gradients flow into
    every view, the clean one included, as in AugMix.

    Args:
        *logits: ``(B, num_classes)`` logits per view; the clean view first by convention.

    Returns:
        A scalar tensor, 0 when all views predict the same distribution.

    Raises:
        ValueError: with fewer than two views or views of different shapes.

    Example:
        >>> clean = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> round(float(jsd_consistency(clean, clean)), 6)
        0.0
        >>> float(jsd_consistency(clean, -clean)) > 0
        True
    """
    if len(logits) < 2:
        raise ValueError(f"`logits` must be at least two views, got {len(logits)}")
    if any(view.shape != logits[0].shape for view in logits):
        raise ValueError(f"`logits` must share one shape, got {[tuple(v.shape) for v in logits]}")
    probs = [F.softmax(view, dim=1) for view in logits]
    log_mixture = torch.stack(probs).mean(0).clamp(1e-7, 1.0).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / len(probs)  # type: ignore[return-value]


class MixingChains(Callback):
    """AugMix mixing chains of the perturbation bank, tilted towards the profile's weak perturbations.

    Each view of an image ``x`` is ``m * x + (1 - m) * sum_k w_k chain_k(x)`` with ``w ~ Dirichlet(alpha)``
    over ``width`` chains, ``m ~ Beta(alpha, alpha)`` and every chain 1..``max_depth`` operations; each
    operation and its severity (uniform in ``[0.5, max_severity]``) are drawn per sample.

    Operation probabilities are ``floor / K + (1 - floor) * q`` over the ``K`` perturbations, where ``q``
    starts uniform and follows a Group-DRO update at each new profile: ``q_k <- q_k * exp(step * gap_k)``,
    renormalised, with ``gap_k`` the perturbation's score in the profile. ``floor=1`` is plain AugMix on the
    bank (no targeting).

    Args:
        perturbations: registered perturbation names; ``None`` means the default bank.
        width: chains mixed per view.
        max_depth: operations per chain, drawn uniformly in ``1..max_depth``.
        alpha: Dirichlet and Beta concentration.
        max_severity: severities are drawn uniformly in ``[0.5, max_severity]``.
        num_views: views returned per call.
        floor: share of the operation draw kept uniform (1: untargeted; the default 0.9 was chosen on the
            robustness benchmark's validation corruptions, where stronger tilts lost accuracy).
        step: step size of the exponentiated (Group-DRO) update on the profile's gaps.
        analyzer: the callback whose newest profile the draw follows at each training epoch start (as a
            Trainer callback); ``None``: only :meth:`update` moves it (untargeted until then).

    Raises:
        TypeError: if ``perturbations`` is a string or ``analyzer`` is not a FailureModeCallback.
        ValueError: if an argument is out of range.

    Example:
        >>> chains = MixingChains(["rotation", "gaussian_noise"], num_views=2)
        >>> views = chains(torch.rand(4, 1, 28, 28))
        >>> len(views), tuple(views[0].shape)
        (2, (4, 1, 28, 28))
        >>> from lightning_synth.profile import Weakness
        >>> chains.update(WeaknessProfile(weaknesses=[Weakness(kind="perturbation", name="gaussian_noise",
        ...     severity=3, error_rate=0.6, gap=0.5, support=64)]))
        >>> [round(p, 3) for p in chains.probabilities().tolist()]
        [0.488, 0.512]
    """

    def __init__(
        self,
        perturbations: Sequence[str] | None = None,
        width: int = 3,
        max_depth: int = 3,
        alpha: float = 1.0,
        max_severity: float = 5.0,
        num_views: int = 2,
        floor: float = 0.9,
        step: float = 1.0,
        analyzer: FailureModeCallback | None = None,
    ) -> None:
        if isinstance(perturbations, str):
            raise TypeError(f"`perturbations` must be a list of names, not a string: {perturbations!r}")
        if analyzer is not None and not isinstance(analyzer, FailureModeCallback):
            raise TypeError(f"`analyzer` must be a FailureModeCallback or None, got {type(analyzer).__name__}")
        self.analyzer = analyzer
        self.bank = PerturbationBank(perturbations)
        if len(self.bank) == 0:
            raise ValueError("`perturbations` must name at least one perturbation, got []")
        check_int("width", width, 1)
        check_int("max_depth", max_depth, 1)
        check_int("num_views", num_views, 1)
        for name, value, low, high in (("alpha", alpha, 0.0, math.inf), ("floor", floor, 0.0, 1.0),
                                       ("step", step, 0.0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"`{name}` must be a float in [{low}, {high}], got {value!r}")
        if not alpha > 0:
            raise ValueError(f"`alpha` must be > 0, got {alpha}")
        top = min(p.max_severity for p in self.bank)
        bad_type = isinstance(max_severity, bool) or not isinstance(max_severity, (int, float))
        if bad_type or not 0.5 <= max_severity <= top:
            raise ValueError(f"`max_severity` must be in [0.5, {top}], got {max_severity!r}")
        self.width, self.max_depth, self.alpha = width, max_depth, float(alpha)
        self.max_severity, self.num_views = float(max_severity), num_views
        self.floor, self.step = float(floor), float(step)
        self.q = torch.full((len(self.bank),), 1.0 / len(self.bank), dtype=torch.float64)
        self.last_epoch: int | None = None

    def probabilities(self) -> Tensor:
        """The current operation probabilities, in bank order (sums to 1)."""
        k = len(self.bank)
        return (self.floor / k + (1.0 - self.floor) * self.q).float()

    def update(self, profile: WeaknessProfile) -> None:
        """One Group-DRO step on the profile's per-perturbation gaps (no change for a profile without any)."""
        if not isinstance(profile, WeaknessProfile):
            raise TypeError(f"`profile` must be a WeaknessProfile, got {type(profile).__name__}")
        scores = profile.perturbation_scores()
        gaps = torch.tensor([scores.get(n, 0.0) for n in self.bank.names], dtype=torch.float64)
        q = self.q * torch.exp(self.step * gaps.clamp(min=0))
        self.q = q / q.sum()
        self.last_epoch = profile.epoch

    def severities(self, ops: Tensor) -> Tensor:
        """The severity of each drawn operation (``ops``: bank indices, one per sample): uniform in
        ``[0.5, max_severity]``, from torch's global RNG (a subclass may draw them otherwise)."""
        return 0.5 + torch.rand(len(ops), device=ops.device) * (self.max_severity - 0.5)

    def chain(self, images: Tensor) -> Tensor:
        """One chain per sample: 1..``max_depth`` operations of the bank, each drawn per sample."""
        b = len(images)
        probs = self.probabilities().to(images.device)
        depth = torch.randint(1, self.max_depth + 1, (b,), device=images.device)
        out = images
        for step in range(self.max_depth):
            active = depth > step
            ops = torch.multinomial(probs, b, replacement=True)
            levels = self.severities(ops)
            nxt = out.clone()
            for index, name in enumerate(self.bank.names):
                rows = ((ops == index) & active).nonzero().squeeze(1)
                if rows.numel():
                    nxt[rows] = self.bank[name](out[rows], levels[rows].cpu()).to(out.dtype)
            out = nxt
        return out

    def mix(self, images: Tensor, num_views: int = 1) -> list[Tensor]:
        """``num_views`` views, each the Dirichlet mix of ``width`` chains blended with ``images`` by a Beta
        weight; all chains of all views run as one batch (each operation is one call on its rows)."""
        b, k = len(images), self.width
        chains = self.chain(images.repeat(num_views * k, 1, 1, 1)).view(num_views, k, *images.shape)
        concentration = torch.full((num_views, b, k), self.alpha)
        weights = torch.distributions.Dirichlet(concentration).sample().to(images)  # (V, B, K)
        keep = torch.distributions.Beta(self.alpha, self.alpha).sample((num_views, b)).to(images)
        mixed = torch.einsum("vbk,vkbchw->vbchw", weights, chains)
        keep = keep.view(num_views, b, 1, 1, 1)
        return list((keep * images.unsqueeze(0) + (1 - keep) * mixed).clamp(0, 1).unbind(0))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """``num_views`` views of ``images`` ``(B, C, H, W)`` in [0, 1]; randomness from torch's global RNG."""
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"`images` must be float (B, C, H, W) in [0, 1], got {getattr(images, 'shape', images)}")
        return self.mix(images, self.num_views)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take one update from the analyzer's newest profile, if it has a new one."""
        profile = self.analyzer.profile if self.analyzer is not None else None
        if profile is not None and profile.epoch != self.last_epoch:
            self.update(profile)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.tolist(), "last_epoch": self.last_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.q = torch.tensor(state_dict["q"], dtype=torch.float64)
        self.last_epoch = state_dict.get("last_epoch")

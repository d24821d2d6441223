"""How much the synthetic data counts, and how the synthetic budget is split across generators.

:class:`SyntheticWeighting` turns two signals into ``synthetic_weight``, the multiplier the sampler applies
to the synthetic share: the synthetic data's quality (discriminator scores, the pool's mean quality) and
learning progress (the model's loss on synthetic data, cut on plateau like ``ReduceLROnPlateau`` and
restored when progress resumes). :func:`allocate_budget` splits next epoch's synthetic budget across
generators by the sampler mass their samples received.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

from lightning_synth._validation import check_int
from lightning_synth.allocation import largest_remainder

__all__ = ["SyntheticWeighting", "allocate_budget"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SyntheticWeighting:
    """``synthetic_weight = clip(base_weight * progress_scale * quality_scale, min_weight, max_weight)``.

    - ``progress_scale`` (at most 1) is multiplied by ``factor`` when the synthetic loss has not improved
      by more than ``threshold`` for more than ``patience`` updates (``"plateau"``), and divided by
      ``factor`` (back up to 1) on each update that improves it again (``"progress"``).
    - ``quality_scale = (quality / quality_reference) ** quality_power`` follows the latest quality
      (``"quality"``); ``quality_power=0`` ignores quality.

    A ``None`` signal leaves its part unchanged.

    Args:
        base_weight: the weight with no plateau and reference quality.
        min_weight: lower bound of the weight.
        max_weight: upper bound of the weight.
        patience: updates with no improvement tolerated before a cut.
        factor: multiplier of a cut, in (0, 1); its inverse is the step of a recovery.
        threshold: the smallest improvement that counts (relative or absolute, see ``threshold_mode``).
        threshold_mode: ``"rel"``: better means ``loss < best * (1 - threshold)``; ``"abs"``:
            ``loss < best - threshold``.
        cooldown: updates to wait after a cut before counting bad updates again.
        quality_reference: the quality at which ``quality_scale`` is 1.
        quality_power: how strongly quality moves the weight (0 disables it).

    Raises:
        ValueError: if an argument is out of range or the bounds are inconsistent.

    Example:
        >>> w = SyntheticWeighting(patience=1, factor=0.5, min_weight=0.1)
        >>> [w.update(loss, None, epoch) for epoch, loss in enumerate([1.0, 1.0, 1.0, 0.5])]
        [1.0, 1.0, 0.5, 1.0]
        >>> w.update(None, 0.8, epoch=4), w.reason
        (0.8, 'quality')
    """

    def __init__(
        self,
        base_weight: float = 1.0,
        min_weight: float = 0.1,
        max_weight: float = 2.0,
        patience: int = 2,
        factor: float = 0.5,
        threshold: float = 1e-2,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        quality_reference: float = 1.0,
        quality_power: float = 1.0,
    ) -> None:
        for name, value in (
            ("min_weight", min_weight),
            ("threshold", threshold),
            ("quality_power", quality_power),
        ):
            if not _is_number(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        if not _is_number(max_weight) or max_weight <= 0 or max_weight < min_weight:
            raise ValueError(
                f"`max_weight` must be > 0 and >= `min_weight` ({min_weight}), got {max_weight!r}"
            )
        self._check_base(base_weight, min_weight, max_weight)
        for name, count in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"`{name}` must be an int >= 0, got {count!r}")
        if not _is_number(factor) or not 0 < factor < 1:
            raise ValueError(f"`factor` must be in (0, 1), got {factor!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"`threshold_mode` must be 'rel' or 'abs', got {threshold_mode!r}")
        if not _is_number(quality_reference) or quality_reference <= 0:
            raise ValueError(f"`quality_reference` must be a finite number > 0, got {quality_reference!r}")
        self._base_weight = float(base_weight)
        self.min_weight = float(min_weight)
        self.max_weight = float(max_weight)
        self.patience = patience
        self.factor = float(factor)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = cooldown
        self.quality_reference = float(quality_reference)
        self.quality_power = float(quality_power)
        self._progress_scale = 1.0
        self._quality_scale = 1.0
        self._best = math.inf
        self._num_bad = 0
        self._cooldown_left = 0
        self._weight = self._combine()
        self.reason = "init"
        self.history: list[dict[str, Any]] = []

    @property
    def weight(self) -> float:
        """The current ``synthetic_weight``."""
        return self._weight

    @property
    def base_weight(self) -> float:
        """The weight with no plateau and reference quality (fixed at construction)."""
        return self._base_weight

    def update(self, synthetic_loss: float | None, quality: float | None, epoch: int) -> float:
        """Fold in one epoch's signals and return the new weight.

        Args:
            synthetic_loss: the model's mean training loss on synthetic samples this epoch (``None``: no
                measurement; a non-finite loss is ignored with a warning).
            quality: the synthetic data's quality in [0, 1], e.g. the pool's mean quality.
            epoch: the epoch the signals belong to (recorded in :attr:`history`).

        Raises:
            ValueError: if ``quality`` is outside [0, 1] or ``epoch`` is negative.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"`epoch` must be an int >= 0, got {epoch!r}")
        if quality is not None and (not _is_number(quality) or not 0 <= quality <= 1):
            raise ValueError(f"`quality` must be None or in [0, 1], got {quality!r}")
        if synthetic_loss is not None and not _is_number(synthetic_loss):
            warnings.warn(
                f"ignoring non-finite synthetic loss {synthetic_loss!r} at epoch {epoch}", stacklevel=2
            )
            synthetic_loss = None
        reasons = []
        if synthetic_loss is not None:
            reasons += self._step_progress(float(synthetic_loss))
        if quality is not None:
            scale = (float(quality) / self.quality_reference) ** self.quality_power
            if scale != self._quality_scale:
                reasons.append("quality")
            self._quality_scale = scale
        self._set_weight(reasons)
        self.history.append(
            {
                "epoch": epoch,
                "weight": self._weight,
                "synthetic_loss": synthetic_loss,
                "quality": quality,
                "reason": self.reason,
            }
        )
        return self._weight

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_weight": self._base_weight,
            "progress_scale": self._progress_scale,
            "quality_scale": self._quality_scale,
            "best": self._best,
            "num_bad": self._num_bad,
            "cooldown_left": self._cooldown_left,
            "weight": self._weight,
            "reason": self.reason,
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = set(self.state_dict()) - set(state_dict)
        if missing:
            raise ValueError(f"weighting state lacks {sorted(missing)}; it has {sorted(state_dict)}")
        self._base_weight = float(state_dict["base_weight"])
        self._progress_scale = float(state_dict["progress_scale"])
        self._quality_scale = float(state_dict["quality_scale"])
        self._best = float(state_dict["best"])
        self._num_bad = int(state_dict["num_bad"])
        self._cooldown_left = int(state_dict["cooldown_left"])
        self._weight = float(state_dict["weight"])
        self.reason = str(state_dict["reason"])
        self.history = [dict(row) for row in state_dict["history"]]

    def _step_progress(self, loss: float) -> list[str]:
        if self._is_better(loss):
            self._best, self._num_bad = loss, 0
            if self._progress_scale < 1.0:
                self._progress_scale = min(1.0, self._progress_scale / self.factor)
                return ["progress"]
            return []
        self._num_bad += 1
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            self._num_bad = 0
        if self._num_bad <= self.patience:
            return []
        floor = self.min_weight / self._base_weight if self._base_weight > 0 else 0.0
        self._progress_scale = max(self._progress_scale * self.factor, min(floor, 1.0))
        self._num_bad, self._cooldown_left = 0, self.cooldown
        return ["plateau"]

    def _is_better(self, loss: float) -> bool:
        if self.threshold_mode == "rel":
            return loss < self._best * (1.0 - self.threshold) if math.isfinite(self._best) else True
        return loss < self._best - self.threshold

    def _combine(self) -> float:
        raw = self._base_weight * self._progress_scale * self._quality_scale
        return min(max(raw, self.min_weight), self.max_weight)

    def _set_weight(self, reasons: list[str]) -> None:
        weight = self._combine()
        self.reason = "+".join(reasons) if reasons and weight != self._weight else "unchanged"
        self._weight = weight

    @staticmethod
    def _check_base(value: float, min_weight: float, max_weight: float) -> None:
        if not _is_number(value) or not min_weight <= value <= max_weight:
            raise ValueError(
                f"`base_weight` must be in [`min_weight`, `max_weight`] = [{min_weight}, {max_weight}], "
                f"got {value!r}"
            )


def allocate_budget(total: int, mass: dict[str, float], min_share: float = 0.1) -> dict[str, int]:
    """Split ``total`` synthetic samples across generators by the sampler mass their samples received.

    Each generator gets ``min_share`` of the total, and the rest goes in proportion to ``mass`` (a uniform
    split when all mass is zero). Counts are rounded by :func:`~lightning_synth.allocation.largest_remainder`,
    so they sum to ``total`` and are the same on every rank. (A user-fixed mix is
    ``SynthesisSettings.generator_budgets``.)

    Args:
        total: the number of samples to split.
        mass: generator name -> non-negative mass; every generator that may generate must appear
            (with 0 if it has no samples yet).
        min_share: the floor of each generator's share, in [0, 1 / len(mass)].

    Raises:
        ValueError: on a negative total, empty or negative mass or an out-of-range ``min_share``.

    Example:
        >>> allocate_budget(100, {"aug": 3.0, "gan": 1.0, "scenario": 0.0}, min_share=0.1)
        {'aug': 63, 'gan': 27, 'scenario': 10}
    """
    check_int("total", total, 0)
    if not mass:
        raise ValueError("`mass` must name at least one generator, got {}")
    bad = {k: v for k, v in mass.items() if not _is_number(v) or v < 0}
    if bad:
        raise ValueError(f"`mass` values must be finite and >= 0, got {bad}")
    if not _is_number(min_share) or not 0 <= min_share <= 1 / len(mass):
        raise ValueError(
            f"`min_share` must be in [0, 1/{len(mass)}] for {len(mass)} generators, got {min_share!r}"
        )
    total_mass = sum(mass.values())
    free = 1.0 - min_share * len(mass)
    shares = {
        name: min_share + free * (m / total_mass if total_mass > 0 else 1 / len(mass)) for name, m in mass.items()
    }
    return largest_remainder(total, shares)

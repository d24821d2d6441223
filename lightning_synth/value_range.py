"""The range and dtype of a user's inputs, so perturbations and generators work in the user's own units.

Every perturbation of the bank and every generator works on float images in ``[0, 1]``. A user's data may be
uint8 in ``[0, 255]`` or mean/std-normalised floats (e.g. ``[-0.42, 2.8]``). A :class:`ValueRange` is read
once from real data (:meth:`ValueRange.detect`) and maps batches to the unit range (:meth:`to_unit`) and back
(:meth:`from_unit`, restoring the user's dtype), so nothing is silently clamped or cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ValueRange"]

_INTEGER_RANGES = {torch.uint8: (0.0, 255.0), torch.int8: (-128.0, 127.0)}


@dataclass(frozen=True)
class ValueRange:
    """A closed value range ``[low, high]`` and the dtype the user's inputs come in.

    Args:
        low: the value that maps to 0.
        high: the value that maps to 1 (``> low``).
        dtype: the dtype :meth:`from_unit` returns; ``None`` keeps the dtype it is given.

    Raises:
        ValueError: if ``low``/``high`` are not finite or ``high <= low``.

    Example:
        >>> vr = ValueRange.detect(torch.tensor([[0, 128, 255]], dtype=torch.uint8))
        >>> vr
        ValueRange(low=0.0, high=255.0, dtype=torch.uint8)
        >>> vr.to_unit(torch.tensor([0, 255], dtype=torch.uint8)).tolist()
        [0.0, 1.0]
        >>> vr.from_unit(torch.tensor([0.0, 0.5, 1.0])).tolist()
        [0, 128, 255]
        >>> ValueRange.detect(torch.tensor([0.1, 0.9]))  # float data inside [0, 1] is taken as [0, 1]
        ValueRange(low=0.0, high=1.0, dtype=torch.float32)
    """

    low: float = 0.0
    high: float = 1.0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"`low` and `high` must be finite, got low={self.low!r}, high={self.high!r}")
        if self.high <= self.low:
            raise ValueError(f"`high` must be > `low`, got low={self.low!r}, high={self.high!r}")

    @classmethod
    def detect(cls, inputs: Tensor) -> ValueRange:
        """The range of ``inputs``: the dtype's range for integer dtypes, else ``[0, 1]`` when the data lie
        inside it, else the data's own min and max.

        Raises:
            ValueError: if ``inputs`` is empty or holds NaN or infinite values (a problem of the user's data).
        """
        if inputs.numel() == 0:
            raise ValueError("Cannot detect the value range of an empty input tensor.")
        if inputs.dtype in _INTEGER_RANGES:
            low, high = _INTEGER_RANGES[inputs.dtype]
            return cls(low, high, inputs.dtype)
        if not inputs.is_floating_point():
            return cls(float(inputs.min()), float(max(inputs.max(), inputs.min() + 1)), inputs.dtype)
        finite = torch.isfinite(inputs)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"Your real input data hold {bad} NaN or infinite values (of {inputs.numel()}): fix the dataset "
                "or its transforms; lightning_synth cannot perturb or imitate them."
            )
        low, high = float(inputs.min()), float(inputs.max())
        if low >= 0.0 and high <= 1.0:
            return cls(0.0, 1.0, inputs.dtype)
        if high <= low:
            high = low + 1.0
        return cls(low, high, inputs.dtype)

    @property
    def is_unit(self) -> bool:
        """Whether the range is ``[0, 1]`` in a floating dtype (mapping is then the identity)."""
        return self.low == 0.0 and self.high == 1.0 and (self.dtype is None or self.dtype.is_floating_point)

    def to_unit(self, inputs: Tensor) -> Tensor:
        """``inputs`` as float in ``[0, 1]`` (values outside the range map outside ``[0, 1]``)."""
        images = inputs if inputs.is_floating_point() else inputs.float()
        if self.is_unit:
            return images
        return (images - self.low) / (self.high - self.low)

    def from_unit(self, images: Tensor) -> Tensor:
        """``images`` in ``[0, 1]`` back in the user's range and dtype (clamped to the range)."""
        images = images.clamp(0.0, 1.0)
        if not self.is_unit:
            images = images * (self.high - self.low) + self.low
        if self.dtype is None or self.dtype == images.dtype:
            return images
        if not self.dtype.is_floating_point:
            images = images.round()
        return images.to(self.dtype)

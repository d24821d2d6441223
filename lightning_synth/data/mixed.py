"""Real and synthetic data in one indexable dataset, each sample in the user's own format."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_synth.batch import TARGET_KEYS, BatchAdapter
from lightning_synth.data.pool import SyntheticPool
from lightning_synth.value_range import ValueRange

__all__ = ["MixedDataset"]


class MixedDataset(Dataset):
    """Indices ``0..n_real-1`` are the user's real samples, ``n_real..`` the synthetic pool's.

    A synthetic sample is written into the structure of a real one (``template``) with the batch adapter,
    so the user's ``training_step`` sees one format: a tuple stays a tuple, a dict keeps its keys, a
    Python-int target stays an int. Fields other than inputs and target get ``-1`` (numbers and integer
    tensors; other values are copied from the template): a synthetic sample has no group or id of its own.
    Pool inputs are in [0, 1]; ``value_range`` maps them back to the user's range and dtype.

    With ``deliver_source``, every sample also carries the input of the real sample it was made from (for a
    consistency objective between the two; see :func:`~lightning_synth.consistency.jsd_consistency`): a
    dict gains the key ``source_key``, a tuple or list one more element at its end. A real sample's source is
    its own input, as is a synthetic sample's whose generator does not report one (a GAN's).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> real = TensorDataset(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]))
        >>> mixed = MixedDataset(real, SyntheticPool(max_samples=4))
        >>> len(mixed), mixed[2][1].item()
        (3, 2)
        >>> len(MixedDataset(real, SyntheticPool(max_samples=4), deliver_source=True)[2])  # (x, y, source)
        3
    """

    def __init__(self, real: Dataset, pool: SyntheticPool, adapter: BatchAdapter | None = None,
                 value_range: ValueRange | None = None, deliver_source: bool = False,
                 source_key: str = "source") -> None:
        if not isinstance(real, Sized):
            raise TypeError(f"`real` must be a sized map-style dataset, got {type(real).__name__}")
        if len(real) == 0:
            raise ValueError("`real` must not be empty: the wrapped datamodule's train set has no samples")
        self.real, self.pool = real, pool
        self.adapter = adapter or BatchAdapter()
        self.num_real = len(real)
        self.template = real[0]
        self.value_range = value_range or ValueRange()
        self.deliver_source, self.source_key = deliver_source, source_key
        if deliver_source and not isinstance(self.template, (Mapping, tuple, list)):
            raise TypeError("`deliver_source` needs samples that are dicts, tuples or lists, got "
                            f"{type(self.template).__name__}")
        if deliver_source and isinstance(self.template, Mapping) and source_key in self.template:
            raise ValueError(f"`source_key` must not be a key of the real samples already, got {source_key!r}")

    def __len__(self) -> int:
        return self.num_real + len(self.pool)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The samples at ``indices`` (what ``[self[i] for i in indices]`` gives), with the synthetic ones read
        and mapped to the user's range in one call: the data loader fetches a batch this way."""
        out: list[Any] = [None] * len(indices)
        synthetic = [k for k, i in enumerate(indices) if i >= self.num_real]
        if synthetic:
            positions = [indices[k] - self.num_real for k in synthetic]
            inputs, targets = self.pool.read(positions)
            inputs = self.value_range.from_unit(inputs)
            for k, x, y in zip(synthetic, inputs, targets, strict=True):
                out[k] = self._as_real(x, y)
            if self.deliver_source:
                for k, x, source in zip(synthetic, inputs, self.pool.sources(positions).tolist(), strict=True):
                    out[k] = self._with_source(out[k], x if source < 0 else self._input(self.real[source]))
        for k, i in enumerate(indices):
            if i < self.num_real:
                out[k] = self.real[i]
                if self.deliver_source:
                    out[k] = self._with_source(out[k], self._input(out[k]))
        return out

    def _input(self, sample: Any) -> Tensor:
        return self.adapter.unpack(sample).inputs

    def _with_source(self, sample: Any, source: Tensor) -> Any:
        if isinstance(sample, Mapping):
            return {**sample, self.source_key: source}
        return type(sample)([*sample, source])

    def _as_real(self, inputs: Tensor, target: Tensor) -> Any:
        template = self.template
        template_target = _sample_target(template, self.adapter)
        value: Any = int(target) if isinstance(template_target, int) else target.to(
            template_target.dtype if isinstance(template_target, Tensor) else torch.long)
        packed = self.adapter.pack(template, inputs, value)
        if isinstance(template, Mapping):
            return {**{k: _unset(v) for k, v in template.items()}, **packed}
        if isinstance(template, (tuple, list)) and len(template) > 2:
            return type(template)([*packed, *(_unset(v) for v in template[2:])])
        return packed


def _unset(value: Any) -> Any:
    """``-1`` in the type of ``value`` (extra fields of a synthetic sample), or ``value`` when it has none."""
    if isinstance(value, Tensor) and not value.dtype.is_floating_point and value.dtype != torch.bool:
        return torch.full_like(value, -1)
    if isinstance(value, Tensor) and value.dtype.is_floating_point:
        return torch.full_like(value, -1.0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return type(value)(-1)
    return value


def _sample_target(sample: Any, adapter: BatchAdapter) -> Any:
    if isinstance(sample, Mapping):
        for key in (adapter.target_key, *TARGET_KEYS):
            if key in sample:
                return sample[key]
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[1]
    return None

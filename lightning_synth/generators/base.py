"""The contract every synthetic-data generator follows.

A generator takes the latest :class:`~lightning_synth.profile.WeaknessProfile` and a budget (how many
samples to make) and returns a :class:`SyntheticBatch`: images, labels and per-sample provenance (which
weakness each sample targets, and a realism/quality score in [0, 1]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_synth.profile import WeaknessProfile
from lightning_synth.value_range import ValueRange

__all__ = ["GenerationContext", "SyntheticBatch", "SyntheticGenerator", "from_levels"]


@dataclass
class SyntheticBatch:
    """Samples made by one generator, with provenance.

    Shape:
        - inputs: ``(N, C, H, W)`` float in [0, 1]
        - targets: ``(N,)`` int64 class labels
        - quality: ``(N,)`` float in [0, 1] (1 when the generator has no realism score)
        - weakness: ``N`` weakness keys (``WeaknessProfile`` keys such as ``"perturbation/rotation@3"``)
        - source_index: ``(N,)`` int64 index of the real sample (in ``context.real_inputs``) each sample was
          made from, -1 where none; ``None`` when the generator does not say
    """

    inputs: Tensor
    targets: Tensor
    weakness: list[str]
    quality: Tensor
    generator: str
    source_index: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        sources = n if self.source_index is None else self.source_index.shape[0]
        if not (self.targets.shape[0] == len(self.weakness) == self.quality.shape[0] == sources == n):
            raise ValueError(
                f"SyntheticBatch fields disagree on length: inputs {n}, targets {self.targets.shape[0]}, "
                f"weakness {len(self.weakness)}, quality {self.quality.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @classmethod
    def empty(cls, generator: str, like: Tensor) -> SyntheticBatch:
        return cls(like[:0], torch.zeros(0, dtype=torch.long), [], torch.zeros(0), generator)


@dataclass(init=False)
class GenerationContext:
    """What a generator may draw on besides the profile.

    Attributes:
        real_inputs: a cached sample of real training inputs ``(M, C, H, W)`` to transform, float in [0, 1]
            (the engine maps the user's range and dtype to [0, 1] and the outputs back, see ``value_range``).
            When the context holds the inputs as uint8 levels (``real_levels``), reading this decodes all
            of them once; :meth:`sample_real` and :meth:`real_rows` decode only the rows they return.
        real_targets: their labels ``(M,)``.
        num_classes: number of classes of the task.
        generator: a seeded RNG. The engine seeds it per rank and per call, and records the seed: the same
            profile, budget and seed must give the same samples (the pool checkpoints that call, not pixels).
        device: where to compute (the task model's device).
        epoch: current epoch.
        task_model: the model being trained (eval mode is the caller's job), or ``None``.
        extras: free-form additions (e.g. real slice attributes under ``"slices"``).
        value_range: the range and dtype of the user's real inputs (already mapped to [0, 1] here).
        real_levels: the real inputs as uint8 levels ``k`` standing for ``k / 255`` (images of 8-bit origin,
            kept so by the engine: a quarter of float32's memory, lossless), or ``None``. Give either
            ``real_inputs`` or ``real_levels``.

    Raises:
        ValueError: if neither or both of ``real_inputs`` and ``real_levels`` are given, or ``real_levels``
            is not uint8.

    Example:
        >>> levels = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1)
        >>> context = GenerationContext(None, torch.arange(8), 8, torch.Generator().manual_seed(0),
        ...                             real_levels=levels)
        >>> torch.equal(context.real_rows(torch.tensor([0, 3])), levels[[0, 3]].float() / 255)
        True
        >>> torch.equal(context.real_inputs, levels.float() / 255)
        True
    """

    real_targets: Tensor
    num_classes: int
    generator: torch.Generator
    device: torch.device
    epoch: int
    task_model: nn.Module | None
    extras: dict[str, Any]
    value_range: ValueRange
    real_levels: Tensor | None

    def __init__(
        self,
        real_inputs: Tensor | None,
        real_targets: Tensor,
        num_classes: int,
        generator: torch.Generator,
        device: torch.device | None = None,
        epoch: int = 0,
        task_model: nn.Module | None = None,
        extras: dict[str, Any] | None = None,
        value_range: ValueRange | None = None,
        real_levels: Tensor | None = None,
    ) -> None:
        if (real_inputs is None) == (real_levels is None):
            raise ValueError("GenerationContext takes `real_inputs` (float in [0, 1]) or `real_levels` (uint8), "
                             f"one of them; got {'both' if real_inputs is not None else 'neither'}")
        if real_levels is not None and real_levels.dtype != torch.uint8:
            raise ValueError(f"`real_levels` must be uint8, got {real_levels.dtype}")
        self._real_inputs = real_inputs
        self.real_levels = real_levels
        self.real_targets, self.num_classes, self.generator = real_targets, num_classes, generator
        self.device = torch.device("cpu") if device is None else device
        self.epoch, self.task_model = epoch, task_model
        self.extras = {} if extras is None else extras
        self.value_range = ValueRange() if value_range is None else value_range

    @property
    def real_inputs(self) -> Tensor:
        """``(M, C, H, W)`` float in [0, 1] (decoded from ``real_levels`` on first read, then kept)."""
        if self._real_inputs is None:
            assert self.real_levels is not None
            self._real_inputs = from_levels(self.real_levels)
        return self._real_inputs

    def real_rows(self, index: Tensor) -> Tensor:
        """The real inputs at ``index`` as float in [0, 1]: the same values as ``real_inputs[index]``, decoding
        only those rows when the context holds levels."""
        if self._real_inputs is not None or self.real_levels is None:
            return self.real_inputs[index]
        return from_levels(self.real_levels[index])

    def sample_real(self, n: int, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``n`` real samples (with replacement), restricted to ``classes`` when given."""
        idx = self.sample_rows(n, classes)
        return self.real_rows(idx), self.real_targets[idx]

    def sample_rows(self, n: int, classes: Tensor | None = None) -> Tensor:
        """The rows :meth:`sample_real` would return (the same draw): a generator that reports each sample's
        real source (``SyntheticBatch.source_index``) draws rows with this and reads them with :meth:`real_rows`."""
        pool = torch.arange(len(self.real_targets))
        if classes is not None:
            pool = pool[torch.isin(self.real_targets, classes.cpu())]
            if len(pool) == 0:
                pool = torch.arange(len(self.real_targets))
        return pool[torch.randint(len(pool), (n,), generator=self.generator)]


def from_levels(levels: Tensor) -> Tensor:
    """uint8 levels ``k`` as the float32 values ``k / 255`` they stand for (the one decoding, so that every
    reader gets bit-identical values)."""
    return levels.float() / 255


class SyntheticGenerator(ABC):
    """Base class: subclasses implement :meth:`generate`; stateful ones override the state methods.

    ``generate`` receives real inputs as float in [0, 1] and returns inputs in [0, 1] with at most
    ``budget`` samples; the engine validates every output and skips a generator whose output breaks the
    contract (with a warning naming it).

    Attributes:
        name: unique name used in provenance, logs and the control API's generator mix.
    """

    name: str = "generator"

    @property
    def replayable(self) -> bool:
        """Whether :meth:`generate` is a pure function of (profile, budget, context with its seed).

        Replayable generators' samples are checkpointed as the call that made them, and re-made on resume;
        others' samples keep their pixels in the checkpoint. Default: stateless generators (an empty
        :meth:`state_dict`) are replayable; override when that is wrong (e.g. a generator that reads
        ``context.task_model``).
        """
        return not self.state_dict()

    @abstractmethod
    def generate(self, profile: WeaknessProfile, budget: int, context: GenerationContext) -> SyntheticBatch:
        """Make up to ``budget`` samples aimed at ``profile``'s weaknesses (CPU tensors out)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        del state_dict

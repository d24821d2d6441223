"""The contract every synthetic-data generator follows.

A generator takes the latest :class:`~lightning_synth.profile.WeaknessProfile` and a budget (how many
samples to make) and returns a :class:`SyntheticBatch`: images, labels and per-sample provenance (which
weakness each sample targets, and a realism/quality score in [0, 1]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_synth.profile import WeaknessProfile
from lightning_synth.value_range import ValueRange

__all__ = ["GenerationContext", "SyntheticBatch", "SyntheticGenerator"]


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


@dataclass
class GenerationContext:
    """What a generator may draw on besides the profile.

    Attributes:
        real_inputs: a cached sample of real training inputs ``(M, C, H, W)`` to transform, float in [0, 1]
            (the engine maps the user's range and dtype to [0, 1] and the outputs back, see ``value_range``).
        real_targets: their labels ``(M,)``.
        num_classes: number of classes of the task.
        generator: a seeded RNG. The engine seeds it per rank and per call, and records the seed: the same
            profile, budget and seed must give the same samples (the pool checkpoints that call, not pixels).
        device: where to compute (the task model's device).
        epoch: current epoch.
        task_model: the model being trained (eval mode is the caller's job), or ``None``.
        extras: free-form additions (e.g. real slice attributes under ``"slices"``).
        value_range: the range and dtype of the user's real inputs (already mapped to [0, 1] here).
    """

    real_inputs: Tensor
    real_targets: Tensor
    num_classes: int
    generator: torch.Generator
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    epoch: int = 0
    task_model: nn.Module | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    value_range: ValueRange = field(default_factory=ValueRange)

    def sample_real(self, n: int, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``n`` real samples (with replacement), restricted to ``classes`` when given."""
        pool = torch.arange(len(self.real_targets))
        if classes is not None:
            pool = pool[torch.isin(self.real_targets, classes.cpu())]
            if len(pool) == 0:
                pool = torch.arange(len(self.real_targets))
        idx = pool[torch.randint(len(pool), (n,), generator=self.generator)]
        return self.real_inputs[idx], self.real_targets[idx]


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

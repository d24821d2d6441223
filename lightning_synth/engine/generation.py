"""Generation calls: bounded chunks, per-rank seeds, output validation, and replay of a recorded call.

A *recipe* is everything one chunk's generation depended on besides the real cache: the generator's name,
the profile (JSON), and each rank's ``(seed, budget)``. :func:`run_part` makes one rank's part, :func:`replay`
makes every rank's parts of a recipe again (no communication needed: each part is a pure function of its
recipe), which is how the pool is checkpointed without pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_synth.data.mapped import mapped_zeros
from lightning_synth.generators.base import GenerationContext, SyntheticBatch, SyntheticGenerator, from_levels
from lightning_synth.profile import WeaknessProfile
from lightning_synth.value_range import ValueRange

__all__ = ["RealCache", "check_output", "concat", "part_seed", "rank_shares", "replay", "run_part"]

_MASK = 2**62 - 1


@dataclass(frozen=True)
class RealCache:
    """A seeded sample of the real training set, mapped to [0, 1], that generators transform.

    Images of 8-bit origin (every value ``k / 255`` exactly, as uint8 data or ``uint8 / 255`` floats map to)
    are kept as their uint8 levels, a quarter of float32's memory and lossless: :attr:`inputs` gives back the
    very same float32 values, and a generation call decodes only the rows it draws
    (:meth:`GenerationContext.sample_real`). Other data are kept as float32.

    Attributes:
        pixels: ``(M, ...)`` the stored inputs: uint8 levels (``inputs * 255``) or float32 in [0, 1].
        targets: ``(M,)`` int64 labels.
        index: ``(M,)`` the dataset index of each row.
        value_range: the user's input range and dtype (to map synthetic samples back).
        num_classes: ``max(targets) + 1``.

    Example:
        >>> unit = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8).float() / 255
        >>> cache = RealCache.build(unit, torch.arange(4), torch.arange(4), ValueRange(), 4)
        >>> cache.pixels.dtype, torch.equal(cache.inputs, unit)
        (torch.uint8, True)
        >>> RealCache.build(unit + 1e-4, torch.arange(4), torch.arange(4), ValueRange(), 4).pixels.dtype
        torch.float32
        >>> read = RealCache.read(lambda index: (unit[index] * 255, index), torch.arange(4), block_bytes=256)
        >>> read.value_range.high, torch.equal(read.pixels, cache.pixels)
        (255.0, True)
    """

    pixels: Tensor
    targets: Tensor
    index: Tensor
    value_range: ValueRange
    num_classes: int

    @classmethod
    def build(cls, inputs: Tensor, targets: Tensor, index: Tensor, value_range: ValueRange,
              num_classes: int) -> RealCache:
        """A cache of ``inputs`` (float in [0, 1]), stored as uint8 levels when that is lossless."""
        return cls(_pack([inputs], ValueRange()), targets, index, value_range, num_classes)

    @classmethod
    def read(cls, real_sample: Callable[[Tensor], tuple[Tensor, Tensor]], index: Tensor,
             block_bytes: int = 4 * 2**20) -> RealCache:
        """The cache of the real samples at ``index``, read with ``real_sample`` (``index -> (inputs in the user's
        range, targets)``) in order, in blocks of about ``block_bytes`` of inputs.

        The same values as one call with the whole ``index``: the range is detected over every block (see
        :meth:`ValueRange.detect`), then each block is mapped to [0, 1] and packed. Reading in blocks keeps
        every buffer small: no transient the size of the whole cache is allocated and freed (a freed buffer of
        that size would raise glibc's mmap and trim thresholds, and the heap would keep more memory mapped).
        """
        first = real_sample(index[:1])
        row = max(first[0][0].numel() * first[0].element_size(), 1)
        rows = max(block_bytes // row, 1)
        blocks = [first, *(real_sample(index[s:s + rows]) for s in range(1, len(index), rows))]
        inputs = [x for x, _ in blocks]
        targets = torch.cat([t for _, t in blocks]).long()
        del blocks
        value_range = _detect(inputs)
        return cls(_pack(inputs, value_range), targets, index, value_range, int(targets.max()) + 1)

    @property
    def inputs(self) -> Tensor:
        """``(M, ...)`` float32 inputs in [0, 1] (a fresh copy when the pixels are stored as uint8)."""
        return self.pixels if self.pixels.is_floating_point() else from_levels(self.pixels)

    def context(self, generator: torch.Generator, **kwargs: Any) -> GenerationContext:
        """A generation context over this cache (holding its uint8 levels as they are: nothing is decoded until
        a generator reads rows)."""
        pixels = self.pixels
        levels = not pixels.is_floating_point()
        return GenerationContext(None if levels else pixels, self.targets, self.num_classes, generator,
                                 value_range=self.value_range, real_levels=pixels if levels else None, **kwargs)


def _detect(blocks: list[Tensor]) -> ValueRange:
    """``ValueRange.detect`` of the blocks one after another, from each block's min and max (what it reads of
    finite data); the concatenation is only made to report non-finite or empty data as ``detect`` does."""
    if any(b.numel() == 0 or (b.is_floating_point() and not bool(torch.isfinite(b).all())) for b in blocks):
        return ValueRange.detect(torch.cat(blocks))
    ends = [v.reshape(1) for b in blocks for v in (b.min(), b.max())]
    return ValueRange.detect(torch.cat(ends))


def _pack(blocks: list[Tensor], value_range: ValueRange) -> Tensor:
    """The blocks mapped to [0, 1] by ``value_range``, one after another: as uint8 levels when every value is
    exactly ``k / 255`` in float32, else as float32 (mapped and checked a block at a time, so that the check
    adds little memory)."""
    shape = (sum(len(b) for b in blocks), *blocks[0].shape[1:])
    levels = mapped_zeros(shape, torch.uint8)  # long-lived: kept out of the heap (see `mapped_zeros`)
    start = 0
    for block in blocks:
        for part in block.split(1024):
            unit = value_range.to_unit(part).float()
            level = _exact_levels(unit)
            if level is None:
                return _floats(blocks, value_range, shape)
            levels[start:start + len(part)] = level
            start += len(part)
    return levels


def _exact_levels(unit: Tensor) -> Tensor | None:
    if not bool(((unit >= 0) & (unit <= 1)).all()):
        return None
    level = (unit * 255).round_().to(torch.uint8)
    return level if torch.equal(from_levels(level), unit) else None


def _floats(blocks: list[Tensor], value_range: ValueRange, shape: tuple[int, ...]) -> Tensor:
    if len(blocks) == 1:
        return value_range.to_unit(blocks[0]).float()
    out = mapped_zeros(shape, torch.float32)
    start = 0
    for block in blocks:
        out[start:start + len(block)] = value_range.to_unit(block)
        start += len(block)
    return out


def part_seed(seed: int, epoch: int, generator_index: int, chunk: int, rank: int) -> int:
    """A 62-bit seed per (run seed, epoch, generator, chunk, rank); deterministic across processes.

    Example:
        >>> part_seed(0, 1, 0, 0, 0) == part_seed(0, 1, 0, 0, 0) != part_seed(0, 1, 0, 0, 1)
        True
    """
    value = 0x9E3779B97F4A7C15
    for part in (seed, epoch, generator_index, chunk, rank):
        value = ((value ^ (part & _MASK)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK
    return value


def rank_shares(total: int, world_size: int) -> list[int]:
    """``total`` split over ranks as evenly as possible, lower ranks first.

    Example:
        >>> rank_shares(7, 3)
        [3, 2, 2]
    """
    return [total // world_size + int(r < total % world_size) for r in range(world_size)]


def check_output(out: Any, budget: int, like: Tensor, num_classes: int) -> str | None:
    """Why ``out`` breaks the generator contract, or ``None`` when it keeps it."""
    if not isinstance(out, SyntheticBatch):
        return f"returned {type(out).__name__}, not a SyntheticBatch"
    if len(out) > budget:
        return f"returned {len(out)} samples for a budget of {budget}"
    if len(out) == 0:
        return None
    if not out.inputs.is_floating_point():
        return f"returned inputs of dtype {out.inputs.dtype}, not floating point in [0, 1]"
    if tuple(out.inputs.shape[1:]) != tuple(like.shape[1:]):
        return f"returned inputs of shape {tuple(out.inputs.shape[1:])}, the real inputs are {tuple(like.shape[1:])}"
    if not bool(torch.isfinite(out.inputs).all()):
        return "returned NaN or infinite inputs"
    targets = out.targets
    if targets.dtype.is_floating_point or targets.ndim != 1:
        return f"returned targets of dtype {targets.dtype} and shape {tuple(targets.shape)}, not (N,) integers"
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        return f"returned labels outside [0, {num_classes}): {sorted(set(targets.tolist()))[:8]}"
    quality = out.quality
    if not bool(torch.isfinite(quality).all()) or bool(((quality < 0) | (quality > 1)).any()):
        return "returned quality outside [0, 1]"
    return None


def run_part(
    generator: SyntheticGenerator,
    profile: WeaknessProfile,
    budget: int,
    seed: int,
    real: RealCache,
    device: torch.device,
    epoch: int,
    task_model: nn.Module | None,
) -> SyntheticBatch | None:
    """One rank's part of a chunk: the generator's validated output on CPU, or ``None`` (with a warning
    naming the generator) when it raised or broke the contract."""
    if budget <= 0:
        return None
    context = real.context(torch.Generator().manual_seed(seed), device=device, epoch=epoch, task_model=task_model)
    was_training = task_model.training if task_model is not None else False
    if task_model is not None:
        task_model.eval()
    try:
        out = generator.generate(profile, budget, context)
        problem = check_output(out, budget, real.pixels, real.num_classes)
    except Exception as error:  # a generator's failure must not stop training
        out, problem = None, f"raised {error!r}"
    finally:
        if task_model is not None:
            task_model.train(was_training)
    if problem is not None:
        warnings.warn(f"Generator {generator.name!r} {problem}; it is skipped this refresh.", RuntimeWarning,
                      stacklevel=2)
        return None
    assert isinstance(out, SyntheticBatch)
    if len(out) == 0:
        return None
    source = out.source_index
    if source is not None:  # context row -> dataset index
        source = torch.where(source >= 0, real.index[source.clamp_min(0).cpu()], torch.full_like(source, -1))
    return SyntheticBatch(out.inputs.detach().cpu().float(), out.targets.detach().cpu().long(), list(out.weakness),
                          out.quality.detach().cpu().float(), generator.name, source)


def concat(batches: list[SyntheticBatch | None], name: str) -> SyntheticBatch | None:
    """The non-empty batches one after another (``None`` when there are none)."""
    parts = [b for b in batches if b is not None and len(b) > 0]
    if not parts:
        return None
    sources = [b.source_index if b.source_index is not None else torch.full((len(b),), -1) for b in parts]
    return SyntheticBatch(
        inputs=torch.cat([b.inputs for b in parts]), targets=torch.cat([b.targets for b in parts]),
        weakness=[w for b in parts for w in b.weakness], quality=torch.cat([b.quality for b in parts]),
        generator=name, source_index=torch.cat(sources),
    )


def replay(recipe: dict[str, Any], generator: SyntheticGenerator, real: RealCache, device: torch.device,
           task_model: nn.Module | None = None) -> SyntheticBatch | None:
    """Make every rank's part of ``recipe`` again, in rank order (what the pool stored for it)."""
    profile = WeaknessProfile.from_json(recipe["profile"])
    parts = [run_part(generator, profile, int(budget), int(seed), real, device, int(recipe["epoch"]), task_model)
             for seed, budget in recipe["parts"]]
    return concat(parts, generator.name)

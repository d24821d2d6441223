"""`SyntheticPool`: a bounded, indexable store of synthetic samples, their provenance and their recipes.

Generators add batches each epoch; when the pool is full, an eviction policy chooses which samples make
room. Pixels live in contiguous CPU tensors (a cache), so the pool pickles cheaply into DataLoader workers.
A batch added with a *recipe* (the generation call that made it: generator, seeds, budgets, profile) is
checkpointed as that recipe plus which of its samples survive, not as pixels: after
:meth:`~SyntheticPool.load_state_dict` the caller replays :meth:`~SyntheticPool.pending_recipes` and hands the
outputs back with :meth:`~SyntheticPool.restore_chunk`. Batches added without a recipe (stateful generators
whose outputs cannot be replayed) keep their pixels in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_synth._validation import check_choice
from lightning_synth.data.mapped import mapped_zeros
from lightning_synth.data.pool_checkpoint import PoolCheckpoint
from lightning_synth.data.pool_records import (
    DTYPES,
    EvictionPolicy,
    PoolSample,
    PoolUpdate,
    StorageDtype,
    bytes_per_sample,
    decode,
    empty_provenance,
    encode,
)
from lightning_synth.generators.base import SyntheticBatch

__all__ = ["EvictionPolicy", "PoolSample", "PoolUpdate", "StorageDtype", "SyntheticPool"]

class SyntheticPool(PoolCheckpoint, Dataset[tuple[Tensor, Tensor]]):
    """A bounded pool of synthetic samples with provenance and a deterministic eviction policy.

    Args:
        max_samples: most samples held at once.
        max_bytes: most bytes of per-sample storage (inputs, targets and provenance); ``None`` for no
            byte bound. The capacity is the smaller of the two bounds once the sample shape is known.
        eviction: which samples make room when full: ``"oldest"`` (lowest ``sample_id``),
            ``"lowest_quality"``, ``"learned"`` (lowest recorded training loss, see
            :meth:`record_losses`; samples with no recorded loss go last) or ``"random"`` (seeded).
            Ties are broken oldest first.
        storage_dtype: how inputs are stored: ``"float32"``, ``"float16"`` or ``"uint8"`` (inputs in
            [0, 1] quantised to 256 levels). Items are always returned as float32.
        seed: seed of the random eviction policy's generator (kept in the state).

    Raises:
        ValueError: if an argument is out of range.

    Example:
        >>> pool = SyntheticPool(max_samples=3)
        >>> inputs, targets = torch.rand(4, 1, 8, 8), torch.arange(4)
        >>> batch = SyntheticBatch(inputs, targets, ["class/1"] * 4, torch.ones(4), "aug")
        >>> update = pool.add(batch, epoch=0)
        >>> len(pool), update.dropped, pool.get(0).generator
        (3, 1, 'aug')
        >>> update = pool.add(SyntheticBatch.empty("gan", batch.inputs), epoch=1)
        >>> pool[0][0].shape
        torch.Size([1, 8, 8])
    """

    def __init__(
        self,
        max_samples: int = 10_000,
        max_bytes: int | None = None,
        eviction: EvictionPolicy = "oldest",
        storage_dtype: StorageDtype = "float32",
        seed: int = 0,
    ) -> None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"`max_samples` must be an int >= 1, got {max_samples!r}")
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
        ):
            raise ValueError(f"`max_bytes` must be None or an int >= 1, got {max_bytes!r}")
        check_choice("eviction", eviction, get_args(EvictionPolicy))
        check_choice("storage_dtype", storage_dtype, DTYPES)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}")
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.eviction = eviction
        self.storage_dtype = storage_dtype
        self.seed = seed
        self._next_id = 0
        self._evicted = 0
        self._store: dict[str, Tensor] = empty_provenance()
        self._size = 0
        self._bytes_per_sample = 0
        self._generator_names: list[str] = []
        self._weakness_names: list[str] = []
        self._weakness_index: dict[str, int] = {}
        self._rng_state = torch.Generator().manual_seed(seed).get_state()
        self._chunks: dict[int, dict[str, Any]] = {}
        self._next_chunk = 0
        self._missing = torch.zeros(0, dtype=torch.bool)  # positions whose pixels await a replay

    # ----------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, targets = self.read([index])
        return inputs[0], targets[0]

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """The samples at ``indices`` in one call: ``(n, ...)`` inputs in [0, 1] and ``(n,)`` targets (a data
        loader's batched fetch decodes a whole batch at once this way).

        Example:
            >>> pool = SyntheticPool(max_samples=4, storage_dtype="uint8")
            >>> inputs, targets = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
            >>> _ = pool.add(SyntheticBatch(inputs, targets, ["class/0"] * 3, torch.ones(3), "aug"), epoch=0)
            >>> tuple(pool.read([2, 0])[0].shape), pool.read([2, 0])[1].tolist()
            ((2, 1, 2, 2), [2, 0])
        """
        positions = torch.tensor([self._position(i) for i in indices], dtype=torch.long)
        if len(positions) and bool(self._missing[positions].any()):
            raise RuntimeError(
                f"pool sample {int(positions[self._missing[positions]][0])} was restored from a checkpoint as a "
                "recipe and has not been replayed yet; replay `pending_recipes()` and pass the outputs to "
                "`restore_chunk()` first"
            )
        return decode(self._store["inputs"][positions], self.storage_dtype), self._store["targets"][positions]

    def get(self, index: int) -> PoolSample:
        """The sample at ``index`` with its provenance."""
        i = self._position(index)
        inputs, target = self[i]
        s = self._store
        loss = float(s["loss"][i])
        return PoolSample(inputs=inputs, target=target, generator=self._generator_names[int(s["generator"][i])],
                          weakness=self._weakness_names[int(s["weakness"][i])], quality=float(s["quality"][i]),
                          epoch=int(s["epoch"][i]), sample_id=int(s["sample_id"][i]),
                          loss=None if loss != loss else loss)

    def sources(self, indices: Sequence[int]) -> Tensor:
        """``(n,)`` the index in the real training set that each sample at ``indices`` was made from (``-1`` where
        its generator did not say, e.g. a GAN's samples)."""
        return self._store["source_index"][torch.tensor([self._position(i) for i in indices], dtype=torch.long)]

    @property
    def capacity(self) -> int:
        """Most samples the pool can hold (``max_samples`` until the first batch fixes the shape)."""
        if self._bytes_per_sample == 0 or self.max_bytes is None:
            return self.max_samples
        return min(self.max_samples, self.max_bytes // self._bytes_per_sample)

    @property
    def nbytes(self) -> int:
        """Bytes of per-sample storage in use."""
        return self._size * self._bytes_per_sample

    @property
    def sample_ids(self) -> Tensor:
        """``(len,)`` unique ids of the samples at each position (a changed id means a replaced slot)."""
        return self._store["sample_id"][: self._size].clone()

    @property
    def mean_quality(self) -> float | None:
        """Mean quality over the pool, ``None`` when empty."""
        return float(self._store["quality"][: self._size].mean()) if self._size else None

    def indices_by_generator(self) -> dict[str, Tensor]:
        """Positions of each generator's samples (generators with no samples are left out)."""
        codes = self._store["generator"][: self._size]
        out = {}
        for code, name in enumerate(self._generator_names):
            positions = torch.nonzero(codes == code).flatten()
            if len(positions):
                out[name] = positions
        return out

    def stats(self) -> dict[str, Any]:
        """Size, bytes, counts by generator and by weakness, mean quality (overall and by generator)."""
        s, n = self._store, self._size
        quality = s["quality"][:n].double()
        by_generator = self._bincount(s["generator"][:n], len(self._generator_names))
        quality_sums = torch.zeros(len(self._generator_names), dtype=torch.float64)
        quality_sums.index_add_(0, s["generator"][:n].long(), quality)
        by_weakness = self._bincount(s["weakness"][:n], len(self._weakness_names))
        return {
            "size": n,
            "capacity": self.capacity,
            "bytes": self.nbytes,
            "evicted": self._evicted,
            "mean_quality": self.mean_quality,
            "count_by_generator": {
                name: int(c) for name, c in zip(self._generator_names, by_generator, strict=True) if c
            },
            "count_by_weakness": {
                name: int(c) for name, c in zip(self._weakness_names, by_weakness, strict=True) if c
            },
            "mean_quality_by_generator": {
                name: float(q / c)
                for name, q, c in zip(self._generator_names, quality_sums, by_generator, strict=True)
                if c
            },
        }

    # ----------------------------------------------------------------------------------------- writing
    def add(self, batch: SyntheticBatch, epoch: int, recipe: dict[str, Any] | None = None) -> PoolUpdate:
        """Store ``batch`` (made at ``epoch``), evicting by the pool's policy when full.

        A batch larger than the capacity keeps its first ``capacity`` samples (its best by quality under
        ``"lowest_quality"``) and replaces the whole pool. With a ``recipe`` (a picklable description of the
        call that made ``batch``, replayable by the caller), checkpoints carry the recipe instead of pixels.

        Raises:
            TypeError: if ``batch`` is not a :class:`SyntheticBatch` or its inputs are not floating point.
            ValueError: if ``epoch`` is negative, the sample shape differs from the pool's, quality is
                outside [0, 1] or inputs are not finite.
        """
        if not isinstance(batch, SyntheticBatch):
            raise TypeError(f"`batch` must be a SyntheticBatch, got {type(batch).__name__}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"`epoch` must be an int >= 0, got {epoch!r}")
        if len(batch) == 0:
            return self._update(torch.zeros(0, dtype=torch.long), 0, torch.zeros(0, dtype=torch.long), 0)
        self._check_batch(batch)
        keep = self._select_incoming(batch)
        m = len(keep)
        n_append = min(m, self.capacity - self._size)
        appended = torch.arange(self._size, self._size + n_append)
        replaced = self._victims(m - n_append)
        evicted_ids = self._store["sample_id"][replaced].clone()
        self._reserve(self._size + n_append)
        positions = torch.cat([appended, replaced])
        chunk = -1
        if recipe is not None:
            chunk, self._next_chunk = self._next_chunk, self._next_chunk + 1
            self._chunks[chunk] = dict(recipe)
        self._write(positions, batch, keep, epoch, chunk)
        self._size += n_append
        self._forget_dead_chunks()
        self._evicted += len(replaced)
        return self._update(positions, n_append, evicted_ids, len(batch) - m)

    def record_losses(
        self, positions: Tensor | Sequence[int], losses: Tensor, sample_ids: Tensor | None = None
    ) -> None:
        """Record the latest training loss of samples (used by ``eviction="learned"``).

        Duplicate positions are averaged. When ``sample_ids`` is given, losses for positions whose sample
        has since been replaced are ignored.

        Raises:
            ValueError: if lengths disagree or a position is out of range.
        """
        positions = torch.as_tensor(positions, dtype=torch.long).flatten()
        losses = torch.as_tensor(losses).detach().cpu().double().flatten()
        if len(positions) != len(losses):
            raise ValueError(f"`positions` ({len(positions)}) and `losses` ({len(losses)}) differ in length")
        if len(positions) and (positions.min() < 0 or positions.max() >= self._size):
            raise ValueError(
                f"`positions` must lie in [0, {self._size}), got {positions.min()}..{positions.max()}"
            )
        if sample_ids is not None:
            sample_ids = torch.as_tensor(sample_ids, dtype=torch.long).flatten()
            if len(sample_ids) != len(positions):
                raise ValueError(
                    f"`sample_ids` ({len(sample_ids)}) and `positions` ({len(positions)}) differ"
                )
            current = self._store["sample_id"][positions] == sample_ids
            positions, losses = positions[current], losses[current]
        sums = torch.zeros(self._size, dtype=torch.float64).index_add_(0, positions, losses)
        counts = torch.zeros(self._size, dtype=torch.float64).index_add_(
            0, positions, torch.ones_like(losses)
        )
        seen = counts > 0
        self._store["loss"][: self._size][seen] = (sums[seen] / counts[seen]).float()

    def clear(self) -> None:
        """Remove every sample and forget the sample shape (ids keep increasing; the RNG is kept)."""
        self._store = empty_provenance()
        self._size = 0
        self._bytes_per_sample = 0
        self._generator_names = []
        self._weakness_names = []
        self._weakness_index = {}
        self._chunks = {}
        self._missing = torch.zeros(0, dtype=torch.bool)

    # ------------------------------------------------------------------------------------------- state
    def _position(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self._size
        if not 0 <= i < self._size:
            raise IndexError(f"pool index {index} is out of range for a pool of {self._size} samples")
        return i

    def _check_batch(self, batch: SyntheticBatch) -> None:
        inputs, targets = batch.inputs, batch.targets
        if not inputs.is_floating_point():
            raise TypeError(
                f"synthetic inputs must be floating point, got {inputs.dtype} from {batch.generator!r}"
            )
        if not torch.isfinite(inputs).all():
            raise ValueError(f"generator {batch.generator!r} produced non-finite inputs; check its output")
        quality = batch.quality.detach()
        if not ((quality >= 0) & (quality <= 1)).all():
            raise ValueError(
                f"generator {batch.generator!r} gave quality outside [0, 1]: {quality.tolist()[:8]}"
            )
        if "inputs" not in self._store:
            self._allocate(inputs, targets)
            return
        stored, stored_t = self._store["inputs"], self._store["targets"]
        if inputs.shape[1:] != stored.shape[1:] or targets.shape[1:] != stored_t.shape[1:]:
            raise ValueError(
                f"the pool holds inputs of shape {tuple(stored.shape[1:])} and targets of shape "
                f"{tuple(stored_t.shape[1:])}; generator {batch.generator!r} gave {tuple(inputs.shape[1:])} "
                f"and {tuple(targets.shape[1:])}"
            )

    def _allocate(self, inputs: Tensor, targets: Tensor) -> None:
        store = {
            "inputs": torch.empty((0, *inputs.shape[1:]), dtype=DTYPES[self.storage_dtype]),
            "targets": torch.empty((0, *targets.shape[1:]), dtype=targets.dtype),
        }
        store.update(empty_provenance())
        self._bytes_per_sample = bytes_per_sample(store)
        if self.capacity < 1:
            bps = self._bytes_per_sample
            self._bytes_per_sample = 0
            raise ValueError(
                f"`max_bytes`={self.max_bytes} is too small for one sample ({bps} bytes for inputs of shape "
                f"{tuple(inputs.shape[1:])} stored as {self.storage_dtype})"
            )
        self._store = store

    def _reserve(self, size: int) -> None:
        allocated = len(self._store["sample_id"])
        if size <= allocated:
            return
        # Grow geometrically so memory follows use while appends stay amortised O(1).
        new = min(self.capacity, max(size, 2 * allocated, 64))
        for key, values in self._store.items():  # on maps of their own: a long-lived pool never pins the heap
            grown = mapped_zeros((new, *values.shape[1:]), values.dtype)
            grown[: self._size] = values[: self._size]
            self._store[key] = grown
        missing = torch.zeros(new, dtype=torch.bool)
        missing[: self._size] = self._missing[: self._size]
        self._missing = missing

    def _select_incoming(self, batch: SyntheticBatch) -> Tensor:
        n, capacity = len(batch), self.capacity
        if n <= capacity:
            return torch.arange(n)
        if self.eviction == "lowest_quality":
            order = torch.sort(batch.quality.detach().cpu(), descending=True, stable=True).indices
            return torch.sort(order[:capacity]).values
        return torch.arange(capacity)

    def _victims(self, k: int) -> Tensor:
        if k <= 0:
            return torch.zeros(0, dtype=torch.long)
        s, n = self._store, self._size
        order = torch.argsort(s["sample_id"][:n], stable=True)
        if self.eviction == "random":
            rng = torch.Generator()
            rng.set_state(self._rng_state)
            order = torch.randperm(n, generator=rng)
            self._rng_state = rng.get_state()
        elif self.eviction != "oldest":
            key = s["quality"][:n] if self.eviction == "lowest_quality" else s["loss"][:n]
            key = torch.nan_to_num(key[order], nan=float("inf"))
            order = order[torch.argsort(key, stable=True)]
        return torch.sort(order[:k]).values

    def _write(self, positions: Tensor, batch: SyntheticBatch, keep: Tensor, epoch: int, chunk: int) -> None:
        s, m = self._store, len(keep)
        if batch.generator not in self._generator_names:
            self._generator_names.append(batch.generator)
        weakness = [batch.weakness[i] for i in keep.tolist()]
        for key in weakness:
            if key not in self._weakness_index:
                self._weakness_index[key] = len(self._weakness_names)
                self._weakness_names.append(key)
        s["inputs"][positions] = encode(batch.inputs.detach().cpu()[keep], self.storage_dtype)
        s["targets"][positions] = batch.targets.detach().cpu()[keep].to(s["targets"].dtype)
        s["quality"][positions] = batch.quality.detach().cpu()[keep].float()
        s["epoch"][positions] = epoch
        s["sample_id"][positions] = torch.arange(self._next_id, self._next_id + m)
        s["loss"][positions] = float("nan")
        s["generator"][positions] = self._generator_names.index(batch.generator)
        codes = [self._weakness_index[key] for key in weakness]
        s["weakness"][positions] = torch.tensor(codes, dtype=torch.int32)
        s["chunk"][positions] = chunk
        s["offset"][positions] = keep
        source = batch.source_index if batch.source_index is not None else torch.full((len(batch),), -1)
        s["source_index"][positions] = source.detach().cpu().long()[keep]
        self._missing[positions] = False
        self._next_id += m

    def _update(self, positions: Tensor, n_append: int, evicted_ids: Tensor, dropped: int) -> PoolUpdate:
        ids = self._store["sample_id"][positions].clone() if len(positions) else positions.clone()
        return PoolUpdate(
            positions=positions,
            appended=positions[:n_append],
            replaced=positions[n_append:],
            evicted_ids=evicted_ids,
            sample_ids=ids,
            dropped=dropped,
            size=self._size,
        )

    @staticmethod
    def _bincount(codes: Tensor, size: int) -> list[int]:
        return torch.bincount(codes.long(), minlength=size).tolist() if size else []

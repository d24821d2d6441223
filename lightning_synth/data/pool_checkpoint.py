"""The checkpoint half of :class:`~lightning_synth.data.pool.SyntheticPool`: recipes instead of pixels.

A batch added with a recipe is checkpointed as that recipe plus, per sample, its chunk and offset; after
:meth:`PoolCheckpoint.load_state_dict` the owner replays :meth:`PoolCheckpoint.pending_recipes` and hands the
outputs back with :meth:`PoolCheckpoint.restore_chunk`. Samples without a recipe keep their pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_synth.data.mapped import mapped_zeros
from lightning_synth.data.pool_records import DTYPES, STATE_VERSION, bytes_per_sample, decode, encode
from lightning_synth.generators.base import SyntheticBatch

__all__ = ["PoolCheckpoint"]


class PoolCheckpoint:
    """Mixin of :class:`~lightning_synth.data.pool.SyntheticPool` (it owns the attributes used here)."""

    max_samples: int
    max_bytes: int | None
    storage_dtype: str
    _store: dict[str, Tensor]
    _size: int
    _missing: Tensor
    _chunks: dict[int, dict[str, Any]]
    _next_chunk: int
    _next_id: int
    _evicted: int
    _rng_state: Tensor
    _generator_names: list[str]
    _weakness_names: list[str]
    _weakness_index: dict[str, int]
    _bytes_per_sample: int

    @property
    def capacity(self) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Provenance of every sample, the recipes still in use, and pixels only of samples without a recipe."""
        n = self._size
        store = {key: values[:n].clone() for key, values in self._store.items() if key != "inputs"}
        pixels = None
        if "inputs" in self._store:
            fixed = self._store["chunk"][:n] < 0
            inputs = self._store["inputs"]
            pixels = {"shape": list(inputs.shape[1:]), "inputs": inputs[:n][fixed].clone()}
        return {
            "version": STATE_VERSION,
            "storage_dtype": self.storage_dtype,
            "store": store,
            "pixels": pixels,
            "chunks": {k: dict(v) for k, v in self._chunks.items()},
            "next_chunk": self._next_chunk,
            "generator_names": list(self._generator_names),
            "weakness_names": list(self._weakness_names),
            "next_id": self._next_id,
            "evicted": self._evicted,
            "rng_state": self._rng_state.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pool: provenance exactly, pixels of recipe samples after :meth:`restore_chunk`.

        Raises:
            ValueError: if the state is from another version or holds more samples than this pool's bounds.
        """
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"pool state version {state_dict.get('version')!r} is not {STATE_VERSION}")
        store = {key: values.clone() for key, values in state_dict["store"].items()}
        pixels = state_dict["pixels"]
        self.clear()
        self._next_id = int(state_dict["next_id"])
        self._evicted = int(state_dict["evicted"])
        self._rng_state = state_dict["rng_state"].clone()
        self._generator_names = list(state_dict["generator_names"])
        self._weakness_names = list(state_dict["weakness_names"])
        self._weakness_index = {name: i for i, name in enumerate(self._weakness_names)}
        self._chunks = {int(k): dict(v) for k, v in state_dict["chunks"].items()}
        self._next_chunk = int(state_dict["next_chunk"])
        if pixels is None:
            return
        n = len(store["sample_id"])
        fixed = store["chunk"] < 0
        inputs = mapped_zeros((n, *pixels["shape"]), DTYPES[self.storage_dtype])
        saved = pixels["inputs"]
        if state_dict["storage_dtype"] != self.storage_dtype:
            saved = encode(decode(saved, state_dict["storage_dtype"]), self.storage_dtype)
        inputs[fixed] = saved
        self._store = {"inputs": inputs, **store}
        self._bytes_per_sample = bytes_per_sample(self._store)
        self._size = n
        self._missing = ~fixed
        if self._size > self.capacity:
            size = self._size
            self.clear()
            raise ValueError(
                f"the saved pool holds {size} samples but `max_samples`={self.max_samples} and "
                f"`max_bytes`={self.max_bytes} allow {self.capacity}; raise the bounds to resume"
            )

    def pending_recipes(self) -> dict[int, dict[str, Any]]:
        """Recipes whose samples are in the pool without pixels (after a load), by chunk id."""
        chunks = self._store["chunk"][: self._size][self._missing[: self._size]].unique().tolist()
        return {int(c): dict(self._chunks[int(c)]) for c in chunks}

    def restore_chunk(self, chunk: int, batch: SyntheticBatch) -> None:
        """Give back the pixels of recipe ``chunk``: ``batch`` is the replayed output of its recipe.

        Raises:
            ValueError: if ``batch`` is too short for the offsets stored, or its sample shape differs.
        """
        positions = torch.nonzero(self._store["chunk"][: self._size] == chunk).flatten()
        offsets = self._store["offset"][positions]
        if len(positions) and int(offsets.max()) >= len(batch):
            raise ValueError(
                f"replay of recipe {chunk} gave {len(batch)} samples but the pool keeps sample {int(offsets.max())} "
                "of it; the generator is not deterministic given its recipe"
            )
        if tuple(batch.inputs.shape[1:]) != tuple(self._store["inputs"].shape[1:]):
            raise ValueError(
                f"replay of recipe {chunk} gave inputs of shape {tuple(batch.inputs.shape[1:])}, the pool holds "
                f"{tuple(self._store['inputs'].shape[1:])}"
            )
        self._store["inputs"][positions] = encode(batch.inputs.detach().cpu()[offsets], self.storage_dtype)
        self._missing[positions] = False

    def _forget_dead_chunks(self) -> None:
        live = set(self._store["chunk"][: self._size].unique().tolist())
        self._chunks = {k: v for k, v in self._chunks.items() if k in live}

    # ----------------------------------------------------------------------------------------- helpers

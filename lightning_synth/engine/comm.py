"""The one communication layer: broadcast, gather of objects, gather of uneven tensors.

Everything in lightning_synth that must agree across processes goes through a :class:`Comm`. In a Lightning
run it is a :class:`StrategyComm` over ``trainer.strategy``; in unit tests and single-process runs it is a
:class:`LocalComm`. No other module calls ``torch.distributed``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Comm", "LocalComm", "StrategyComm"]


@runtime_checkable
class Comm(Protocol):
    """What the engine needs from a process group (every call is a collective: all ranks must make it)."""

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``src``'s ``obj`` on every rank."""

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""

    def gather_uneven(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (sizes may differ along dim 0) concatenated in rank order, on every rank."""


class LocalComm:
    """A single process: broadcast is the identity, gathers return the one rank's value.

    Example:
        >>> comm = LocalComm()
        >>> comm.broadcast({"a": 1}), comm.gather_objects(3), comm.gather_uneven(torch.ones(2)).tolist()
        ({'a': 1}, [3], [1.0, 1.0])
    """

    world_size = 1
    rank = 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def gather_uneven(self, tensor: Tensor) -> Tensor:
        return tensor


class StrategyComm:
    """A :class:`Comm` over a Lightning strategy (``trainer.strategy``): its ``broadcast`` and ``all_gather``.

    Objects are gathered with ``torch.distributed.all_gather_object`` (Lightning strategies have no object
    gather); uneven tensors are padded to the largest size, gathered with ``strategy.all_gather`` and unpadded.

    Args:
        strategy: a Lightning strategy (anything with ``world_size``, ``global_rank``, ``broadcast``,
            ``all_gather`` and ``root_device``).
    """

    def __init__(self, strategy: Any) -> None:
        for name in ("broadcast", "all_gather"):
            if not callable(getattr(strategy, name, None)):
                raise TypeError(f"`strategy` must have a `{name}` method, got {type(strategy).__name__}")
        self.strategy = strategy

    @property
    def world_size(self) -> int:
        return max(int(getattr(self.strategy, "world_size", 1)), 1)

    @property
    def rank(self) -> int:
        return int(getattr(self.strategy, "global_rank", 0))

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        return self.strategy.broadcast(obj, src=src)

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def gather_uneven(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        device = self.strategy.root_device
        local = tensor.to(device)
        sizes = self.strategy.all_gather(torch.tensor([local.shape[0]], device=device)).reshape(-1).tolist()
        width = max(sizes)
        if width == 0:
            return tensor
        padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=device)
        padded[: local.shape[0]] = local
        gathered = self.strategy.all_gather(padded).reshape(len(sizes), width, *local.shape[1:])
        return torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))]).to(tensor.device)

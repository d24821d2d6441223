"""Long-lived buffers on memory maps of their own, outside the C allocator's heap.

glibc's ``malloc`` serves most allocations of a training loop from one heap that only shrinks from its top.
A buffer that lives for epochs (the synthetic pool, the real-sample cache) allocated there while the heap is
large sits high in it, and every page below stays mapped however much of it is freed: the process keeps
memory it no longer uses. :func:`mapped_zeros` gives such buffers an anonymous memory map of their own
instead (Python's :mod:`mmap`, on every platform), so they never pin the heap and their pages go back to the
operating system as soon as the tensor is freed. Process-wide allocator settings are left alone.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["MIN_MAPPED_BYTES", "mapped_extended", "mapped_zeros"]

MIN_MAPPED_BYTES = 64 * 1024


def mapped_zeros(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A zero-filled CPU tensor on an anonymous memory map of its own (``torch.zeros`` below
    :data:`MIN_MAPPED_BYTES`, where a map of its own would only waste a page).

    The tensor behaves as any other: it pickles, saves, deep-copies and moves to shared memory; its pages are
    committed when first written, and unmapped when the last tensor viewing them is freed.

    Example:
        >>> buffer = mapped_zeros((256, 1, 28, 28), torch.uint8)
        >>> buffer.shape, buffer.dtype, int(buffer.sum())
        (torch.Size([256, 1, 28, 28]), torch.uint8, 0)
    """
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes < MIN_MAPPED_BYTES:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def mapped_extended(values: Tensor, n: int, fill: float | bool = 0) -> Tensor:
    """``values`` followed by ``fill`` up to length ``n`` (``>= len(values)``), in a buffer of
    :func:`mapped_zeros`.

    Example:
        >>> mapped_extended(torch.tensor([1.0, 2.0]), 4, fill=-1.0).tolist()
        [1.0, 2.0, -1.0, -1.0]
    """
    out = mapped_zeros((n, *values.shape[1:]), values.dtype)
    out[: len(values)] = values
    out[len(values):] = fill
    return out

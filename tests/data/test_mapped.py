"""Long-lived buffers on maps of their own: zero-filled, ordinary tensors in every use, out of the heap."""

import copy
import io
import pickle
import sys
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # (registers torch's reductions with ForkingPickler)

from lightning_synth.data.mapped import MIN_MAPPED_BYTES, mapped_zeros
from lightning_synth.data.pool import SyntheticPool
from lightning_synth.generators.base import SyntheticBatch

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _mapping_of(address):
    """The /proc/self/maps line of the mapping holding ``address`` (``None`` when none does)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return line
    return None


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int64, torch.bool])
def test_buffers_are_zeros_of_the_shape_and_dtype_asked(dtype):
    for shape in [(3, 2), (300, 1, 28, 28)]:
        buffer = mapped_zeros(shape, dtype)
        assert buffer.shape == shape and buffer.dtype == dtype and not bool(buffer.any())
        buffer[1] = 1
        assert int(buffer.sum()) == buffer[1].numel()


def test_a_mapped_buffer_pickles_saves_copies_and_shares_as_any_tensor():
    buffer = mapped_zeros((512, 256), torch.float32)
    buffer[7] = torch.arange(256)
    saved = io.BytesIO()
    torch.save({"b": buffer}, saved)
    saved.seek(0)
    copies = [pickle.loads(pickle.dumps(buffer)), copy.deepcopy(buffer), torch.load(saved)["b"],
              pickle.loads(ForkingPickler.dumps(buffer))]  # what DataLoader workers started by spawn receive
    assert all(torch.equal(c, buffer) for c in copies)
    buffer.share_memory_()
    assert buffer.is_shared() and float(buffer[7, 255]) == 255.0


@linux_only
def test_large_buffers_live_outside_the_heap_and_are_unmapped_when_freed():
    small = mapped_zeros((MIN_MAPPED_BYTES // 8,), torch.uint8)
    large = mapped_zeros((MIN_MAPPED_BYTES,), torch.uint8)
    assert "[heap]" not in (_mapping_of(large.data_ptr()) or "[heap]")
    address = large.data_ptr()
    view = large[10:20]
    del large
    assert _mapping_of(address) is not None  # a view keeps the map alive
    del view
    assert _mapping_of(address) is None
    assert small.numel() == MIN_MAPPED_BYTES // 8  # a small one is an ordinary tensor


@linux_only
def test_the_pool_keeps_its_pixels_on_a_map_of_its_own():
    pool = SyntheticPool(max_samples=500, storage_dtype="uint8")
    batch = SyntheticBatch(torch.rand(300, 1, 28, 28), torch.arange(300) % 10, ["w"] * 300, torch.ones(300), "g")
    pool.add(batch, epoch=0)
    inputs = pool._store["inputs"]
    assert inputs.nbytes >= MIN_MAPPED_BYTES and "[heap]" not in (_mapping_of(inputs.data_ptr()) or "[heap]")
    assert torch.equal(pool[5][0], (batch.inputs[5] * 255).round() / 255)

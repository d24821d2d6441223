import torch

from lightning_synth.callbacks._hooks import StepRecords, empty_pairs


def test_step_records_keep_every_step_in_order_and_grow():
    records = StepRecords()
    expected = []
    for step in range(40):  # 40 x 64 = 2560 rows: past the first buffer of 1024
        pos = torch.arange(step * 64, (step + 1) * 64)
        values = torch.stack([pos.float(), -pos.float()], 1)
        records.append(pos, pos * 3, values)
        expected.append((pos, pos * 3, values))
    assert len(records) == 2560
    pos, idx, values = records.take()
    want = [torch.cat(parts) for parts in zip(*expected)]
    assert torch.equal(pos, want[0]) and torch.equal(idx, want[1]) and torch.equal(values, want[2])
    assert len(records) == 0
    # after a take, the buffer is reused from the start; what was taken is a copy
    records.append(torch.tensor([5]), torch.tensor([6]), torch.tensor([[1.0, 2.0]]))
    assert pos[0] == 0 and [t.tolist() for t in records.take()] == [[5], [6], [[1.0, 2.0]]]


def test_empty_step_records_take_like_empty_pairs():
    got, want = StepRecords().take(), empty_pairs()
    assert [(t.dtype, tuple(t.shape)) for t in got] == [(t.dtype, tuple(t.shape)) for t in want]

import pytest
import torch

from lightning_synth.engine.comm import Comm, LocalComm, StrategyComm


class TwoRankStrategy:
    """A fake 2-process strategy: rank 1 always holds ``other`` (shaped like the padded local tensor)."""

    world_size, global_rank, root_device = 2, 0, torch.device("cpu")

    def __init__(self, other: torch.Tensor) -> None:
        self.other, self.calls = other, []

    def broadcast(self, obj, src=0):
        self.calls.append(("broadcast", src))
        return obj

    def all_gather(self, tensor):
        self.calls.append(("all_gather", tuple(tensor.shape)))
        if tensor.shape == (1,):  # the sizes round
            return torch.stack([tensor, torch.tensor([self.other.shape[0]])])
        other = torch.zeros_like(tensor)
        other[: self.other.shape[0]] = self.other
        return torch.stack([tensor, other])


def test_local_comm_is_the_identity():
    comm = LocalComm()
    assert isinstance(comm, Comm)
    assert comm.broadcast([1, 2]) == [1, 2] and comm.gather_objects("a") == ["a"]
    assert comm.world_size == 1 and comm.rank == 0


def test_gather_uneven_pads_and_unpads_in_rank_order():
    other = torch.tensor([[7, 8], [9, 10], [11, 12]])
    comm = StrategyComm(TwoRankStrategy(other))
    mine = torch.tensor([[1, 2]])
    out = comm.gather_uneven(mine)
    assert out.tolist() == [[1, 2], [7, 8], [9, 10], [11, 12]]
    # the local tensor was padded to the largest rank's size before the gather
    assert ("all_gather", (3, 2)) in comm.strategy.calls


def test_strategy_comm_needs_a_strategy():
    with pytest.raises(TypeError, match="`strategy` must have a `broadcast` method"):
        StrategyComm(object())


def test_single_process_strategy_makes_no_collective_call():
    strategy = TwoRankStrategy(torch.zeros(0))
    strategy.world_size = 1
    comm = StrategyComm(strategy)
    assert comm.broadcast(3) == 3 and comm.gather_objects(3) == [3]
    assert comm.gather_uneven(torch.ones(2)).tolist() == [1.0, 1.0] and strategy.calls == []

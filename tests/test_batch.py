import pytest
import torch

from lightning_synth.batch import BatchAdapter, BatchView, resolve_batch_adapter


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="`input_key` must be a string"):
        BatchAdapter(input_key=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`slice_keys` must be a sequence of strings"):
        BatchAdapter(slice_keys="group")
    with pytest.raises(TypeError, match="`batch_adapter` must be"):
        resolve_batch_adapter(42)  # type: ignore[arg-type]


def test_reads_tuples_dicts_and_groups():
    x, y, g = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0])
    view = BatchAdapter().unpack((x, y, g))
    assert torch.equal(view.slices["group"], g)
    view = BatchAdapter().unpack({"pixel_values": x, "labels": y, "group": g, "meta": "ignored"})
    assert torch.equal(view.inputs, x) and torch.equal(view.slices["group"], g)
    view = BatchAdapter(input_key="a", target_key="b", slice_keys=["c"]).unpack({"a": x, "b": y, "c": g})
    assert set(view.slices) == {"c"}
    custom = resolve_batch_adapter(lambda batch: (batch["a"], batch["b"]))
    assert torch.equal(custom.unpack({"a": x, "b": y}).targets, y)
    packed = BatchAdapter().pack({"image": x, "label": y}, x[:1], y[:1])
    assert set(packed) == {"image", "label"} and len(packed["label"]) == 1


def test_clear_errors_for_unreadable_batches():
    with pytest.raises(TypeError, match="cannot read this batch: Tensor"):
        BatchAdapter().unpack(torch.zeros(3))
    with pytest.raises(KeyError, match="keys present"):
        BatchAdapter(input_key="img").unpack({"x": torch.zeros(2, 1), "y": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(KeyError, match="Cannot find one of"):
        BatchAdapter().unpack({"features": torch.zeros(2, 1), "y": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(TypeError, match="Targets must be integer class indices"):
        BatchAdapter().unpack((torch.zeros(2, 1), torch.zeros(2)))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        BatchAdapter().unpack((torch.zeros(3, 1), torch.zeros(2, dtype=torch.long)))
    assert isinstance(BatchAdapter().unpack((torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))), BatchView)

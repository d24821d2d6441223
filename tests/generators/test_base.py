"""`GenerationContext` over float inputs or uint8 levels: the same values and draws either way."""

import pytest
import torch

from lightning_synth.generators.base import GenerationContext, from_levels


def _pair(seed=0):
    levels = torch.randint(0, 256, (50, 1, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    targets = torch.arange(50) % 5
    floats = GenerationContext(from_levels(levels), targets, 5, torch.Generator().manual_seed(7))
    packed = GenerationContext(None, targets, 5, torch.Generator().manual_seed(7), real_levels=levels)
    return levels, floats, packed


def test_rows_and_draws_are_the_same_over_levels_and_over_floats():
    levels, floats, packed = _pair()
    index = torch.tensor([4, 0, 4, 49])
    assert torch.equal(packed.real_rows(index), floats.real_rows(index))
    assert torch.equal(packed.real_rows(index), levels[index].float() / 255)
    for classes in (None, torch.tensor([1, 3]), torch.tensor([9])):  # 9: no such class, the whole cache
        a, b = packed.sample_real(17, classes), floats.sample_real(17, classes)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if classes is not None and int(classes[0]) < 5:
            assert bool(torch.isin(a[1], classes).all())
    assert packed.real_rows(torch.zeros(0, dtype=torch.long)).shape == (0, 1, 4, 4)


def test_sample_rows_is_the_draw_of_sample_real():
    _, floats, _ = _pair()
    for classes in (None, torch.tensor([1, 3])):
        state = floats.generator.get_state()
        rows = floats.sample_rows(11, classes)
        floats.generator.set_state(state)
        images, labels = floats.sample_real(11, classes)
        assert torch.equal(images, floats.real_rows(rows)) and torch.equal(labels, floats.real_targets[rows])


def test_reading_all_inputs_decodes_once_and_keeps_them():
    levels, floats, packed = _pair(1)
    assert packed.real_inputs.dtype == torch.float32 and torch.equal(packed.real_inputs, floats.real_inputs)
    assert packed.real_inputs is packed.real_inputs  # decoded on the first read only
    assert floats.real_levels is None and packed.real_levels is levels


def test_defaults_and_bad_arguments():
    context = GenerationContext(torch.rand(3, 1, 2, 2), torch.arange(3), 3, torch.Generator())
    assert context.device == torch.device("cpu") and context.epoch == 0 and context.extras == {}
    assert context.task_model is None and context.value_range.is_unit
    with pytest.raises(ValueError, match="one of them; got both"):
        GenerationContext(torch.rand(3, 1, 2, 2), torch.arange(3), 3, torch.Generator(),
                          real_levels=torch.zeros(3, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="got neither"):
        GenerationContext(None, torch.arange(3), 3, torch.Generator())
    with pytest.raises(ValueError, match="`real_levels` must be uint8"):
        GenerationContext(None, torch.arange(3), 3, torch.Generator(), real_levels=torch.zeros(3, 1, 2, 2))

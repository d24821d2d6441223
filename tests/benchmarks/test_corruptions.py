import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch

# `benchmarks` is not an installed package: make the repository root importable under plain `pytest` too.
if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.corruptions import CORRUPTIONS, NUM_SEVERITIES, corrupt
from lightning_synth.datasets import load_fashion_mnist

BANK_NAMES = {
    "rotation",
    "translation",
    "scale",
    "gaussian_blur",
    "motion_blur",
    "gaussian_noise",
    "occlusion",
    "contrast",
    "brightness",
}
RANDOM = {"fog", "elastic", "impulse_noise", "speckle_noise", "spatter"}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    try:
        return load_fashion_mnist("test")[0][:48]
    except FileNotFoundError as error:  # pragma: no cover - the data ship with the machines
        pytest.skip(str(error))


def test_bad_arguments_raise():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="`name` must be one of"):
        corrupt(x, "rotation", 1)
    with pytest.raises(ValueError, match=r"`severity` must be in 1\.\.5, got 0"):
        corrupt(x, "fog", 0)
    with pytest.raises(ValueError, match=r"`severity` must be in 1\.\.5, got 6"):
        corrupt(x, "fog", 6)
    with pytest.raises(TypeError, match="`severity` must be an int"):
        corrupt(x, "fog", 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`severity` must be an int"):
        corrupt(x, "fog", True)
    with pytest.raises(TypeError, match="`seed` must be an int"):
        corrupt(x, "fog", 1, seed=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`images` must be a floating-point tensor"):
        corrupt(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match=r"`images` must be \(B, C, H, W\), got shape \(1, 8, 8\)"):
        corrupt(torch.rand(1, 8, 8), "fog", 1)
    with pytest.raises(ValueError, match="`jpeg` needs 1 or 3 channels, got 2"):
        corrupt(torch.rand(1, 2, 8, 8), "jpeg", 1)


def test_held_out_from_the_library_bank():
    assert len(CORRUPTIONS) >= 7
    assert not BANK_NAMES & set(CORRUPTIONS)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_deterministic_from_seed(name, images):
    first = corrupt(images, name, 3, seed=7)
    assert torch.equal(first, corrupt(images, name, 3, seed=7))
    if name in RANDOM:
        assert not torch.equal(first, corrupt(images, name, 3, seed=8))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_and_range_preserved(name, channels, images):
    batch = images[:6].repeat(1, channels, 1, 1) * torch.linspace(0.5, 1.0, channels).view(1, -1, 1, 1)
    original = batch.clone()
    for severity in range(1, NUM_SEVERITIES + 1):
        out = corrupt(batch, name, severity, seed=0)
        assert out.shape == batch.shape and out.dtype == batch.dtype
        assert out.min() >= 0 and out.max() <= 1
        assert not torch.equal(out, batch)
    assert torch.equal(batch, original), "the input must not be modified in place"


# glass_blur's ladder is known not to be monotone in pixel change (its blur grows faster than its
# displacement at levels 2 and 4). It is a validation corruption, scored as a mean over the five levels, and
# the published validation numbers were made with this ladder, so it is kept and the flaw is pinned here.
_GLASS = pytest.mark.xfail(strict=True, reason="glass_blur ladder: levels 2 and 4 change images less than 1 and 3")


@pytest.mark.parametrize("name", [pytest.param(n, marks=_GLASS) if n == "glass_blur" else n for n in CORRUPTIONS])
def test_severity_is_monotone(name, images):
    change = [float((corrupt(images, name, s, seed=0) - images).abs().mean()) for s in range(1, 6)]
    assert all(a < b for a, b in pairwise(change)), change


def test_empty_batch_and_odd_sizes():
    assert corrupt(torch.rand(0, 1, 28, 28), "fog", 1).shape == (0, 1, 28, 28)
    for name in CORRUPTIONS:
        assert corrupt(torch.rand(2, 3, 13, 21), name, 5, seed=1).shape == (2, 3, 13, 21)


def test_validation_corruptions_are_disjoint_from_test_and_bank():
    from benchmarks.corruptions import LOFO_FAMILIES, TEST_CORRUPTIONS, VALIDATION_CORRUPTIONS

    assert set(TEST_CORRUPTIONS) | set(VALIDATION_CORRUPTIONS) == set(CORRUPTIONS)
    assert not set(TEST_CORRUPTIONS) & set(VALIDATION_CORRUPTIONS)
    assert not BANK_NAMES & set(VALIDATION_CORRUPTIONS)
    for removed, tested_on in LOFO_FAMILIES.values():
        assert set(removed) <= BANK_NAMES and set(tested_on) <= set(TEST_CORRUPTIONS)

import pytest
import torch

from lightning_synth.perturbations import (
    Perturbation,
    PerturbationBank,
    default_bank,
    parse_spec,
    register_perturbation,
)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unregistered perturbations \\['nope'\\]"):
        PerturbationBank(["nope"])
    with pytest.raises(TypeError, match="not a string"):
        PerturbationBank("rotation")
    with pytest.raises(ValueError, match="must not repeat"):
        PerturbationBank(["rotation", "rotation"])
    with pytest.raises(ValueError, match="`severity` of 'rotation' must be in \\[0, 5\\]"):
        default_bank()["rotation"](torch.rand(1, 1, 8, 8), 6)
    with pytest.raises(ValueError, match="float images of shape"):
        default_bank()["rotation"](torch.rand(8, 8), 1)
    with pytest.raises(ValueError, match="Cannot parse"):
        parse_spec("rotation@")
    with pytest.raises(TypeError, match="must be a Perturbation"):
        register_perturbation("rotation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered already"):
        register_perturbation(default_bank()["rotation"])


@pytest.mark.parametrize("name", default_bank().names)
def test_each_perturbation_reproducible_and_monotone(name):
    images = torch.rand(16, 1, 28, 28) * 0.6 + 0.2
    op = default_bank()[name]
    out = [op(images, s, torch.Generator().manual_seed(1)) for s in (1, 3, 5)]
    again = op(images, 3, torch.Generator().manual_seed(1))
    assert torch.equal(out[1], again)
    assert all(o.shape == images.shape and o.min() >= 0 and o.max() <= 1 for o in out)
    change = [(o - images).abs().mean().item() for o in out]
    assert change[0] < change[1] < change[2], change
    assert torch.allclose(op(images, 0.0), images, atol=1e-5)


def test_per_sample_params_are_batch_independent():
    images = torch.rand(6, 1, 28, 28)
    op = default_bank()["gaussian_noise"]
    full = op.apply(images, op.sample_params_per_sample(images.shape, 2, range(6)))
    part = op.apply(images[3:], op.sample_params_per_sample(images[3:].shape, 2, range(3, 6)))
    assert torch.equal(full[3:], part)


def test_tensor_severities_and_spec():
    images = torch.rand(4, 3, 16, 16)
    out = default_bank()["motion_blur"](images, torch.tensor([0.5, 1.0, 2.5, 5.0]))
    assert out.shape == images.shape
    assert parse_spec("rotation@2.5") == ("rotation", 2.5)
    assert parse_spec("rotation") == ("rotation", 5.0)
    assert default_bank().apply("contrast@1", images).shape == images.shape


def test_register_custom_perturbation():
    class Invert(Perturbation):
        name, unit, ladder = "test_invert", "blend", (0.2, 0.4, 0.6, 0.8, 1.0)

        def sample_params(self, shape, magnitude, generator):
            return {"alpha": magnitude}

        def apply_params(self, images, params):
            a = params["alpha"].view(-1, 1, 1, 1)
            return (1 - a) * images + a * (1 - images)

    register_perturbation(Invert(), overwrite=True)
    bank = PerturbationBank(["rotation", "test_invert"])
    assert bank.names == ["rotation", "test_invert"]
    assert bank.apply("test_invert@5", torch.zeros(1, 1, 2, 2)).min().item() == 1.0


@pytest.mark.parametrize("name", default_bank().names)
def test_keyed_parameters_are_per_sample_and_vectorised(name):
    """A sample's parameters depend on its own seed only: the same whatever batch it is drawn in."""
    op = default_bank()[name]
    shape = torch.Size((6, 1, 12, 12))
    seeds = torch.arange(100, 106)
    together = op.sample_params_per_sample(shape, 3, seeds)
    apart = op.sample_params_per_sample(torch.Size((2, 1, 12, 12)), 3, seeds[[4, 1]])
    for key, value in together.items():
        assert torch.equal(value[[4, 1]], apart[key]), key
    other = op.sample_params_per_sample(shape, 3, seeds + 1000)
    assert op.magnitude(3).item() > 0
    if name not in ("gaussian_blur", "contrast"):  # deterministic in the magnitude alone
        assert any(not torch.equal(v, other[k]) for k, v in together.items())


def test_keyed_uniforms_look_uniform():
    from lightning_synth.perturbations import KeyedRandom

    u = KeyedRandom(torch.arange(20000)).uniform()
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    z = KeyedRandom(torch.arange(20000)).normal(4)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02

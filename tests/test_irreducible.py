import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_synth.batch import BatchView
from lightning_synth.datasets import load_digits_tensors
from lightning_synth.irreducible import IrreducibleLoss


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def _batches(images, labels, size=64):
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ValueError, "`epochs` must be >= 1, got 0"),
        ({"lr": 0.0}, ValueError, r"`lr` must be in \(0.0, None\], got 0.0"),
        ({"perturbed_share": 1.5}, ValueError, r"`perturbed_share` must be in \[0.0, 1.0\], got 1.5"),
        ({"seed": "0"}, TypeError, "`seed` must be an int"),
        ({"perturbations": ["nope"]}, ValueError, "unregistered perturbations"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        IrreducibleLoss(**kwargs)


def test_learns_the_heldout_data_and_leaves_the_task_model_alone():
    images, labels = load_digits_tensors()
    holdout, train = slice(0, 600), slice(600, None)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    il = IrreducibleLoss(epochs=5, lr=1e-2, perturbations=["gaussian_noise", "rotation"])
    assert not il.fitted
    il.fit(model, _batches(images[holdout], labels[holdout]))
    assert il.fitted and model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm statistics untouched
    with torch.no_grad():
        model.eval()
        untrained = F.cross_entropy(model(images[train]), labels[train], reduction="none")
    heldout_trained = il(model, images[train], labels[train])
    assert heldout_trained.shape == (len(images) - 600,)
    assert heldout_trained.mean() < 0.5 * untrained.mean()  # it generalises from the held-out samples
    assert not model.training  # mode restored to what it was at the call


def test_seeded_and_state_round_trip():
    images, labels = load_digits_tensors()
    batches = _batches(images[:256], labels[:256])
    first, second = IrreducibleLoss(seed=3), IrreducibleLoss(seed=3)
    first.fit(_model(), batches)
    second.fit(_model(), batches)
    assert torch.equal(first(_model(), images[300:340], labels[300:340]),
                       second(_model(), images[300:340], labels[300:340]))  # same seed, same weights
    restored = IrreducibleLoss()
    restored.load_state_dict(first.state_dict())
    assert torch.equal(restored(_model(), images[:8], labels[:8]), first(_model(), images[:8], labels[:8]))


def test_errors_before_fit_and_on_empty_holdout():
    with pytest.raises(RuntimeError, match="call `fit` on held-out data first"):
        IrreducibleLoss()(_model(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`batches` must hold at least one held-out batch"):
        IrreducibleLoss().fit(_model(), [])


def test_subtract_computes_each_missing_estimate_once():
    images, labels = load_digits_tensors()
    model, il = _model(), IrreducibleLoss(epochs=1)
    il.fit(model, _batches(images[:128], labels[:128]))
    store = torch.full((10,), float("nan"), dtype=torch.float64)
    store[3] = 7.0  # already known: kept, not recomputed
    rows = torch.tensor([3, 4, 4, 9])
    x, y = images[200:204], labels[200:204]
    losses = torch.ones(4)
    out = il.subtract(model, losses, BatchView(x, y), store, rows)
    fresh = il(model, x, y)
    assert out[0] == 1.0 - 7.0 and torch.allclose(out[1:], 1.0 - fresh[1:])
    assert store[9] == fresh[3].double() and store[3] == 7.0 and torch.isnan(store[:3]).all()

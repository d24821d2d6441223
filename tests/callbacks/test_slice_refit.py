"""`SliceBalancedRefit` on 8x8 digits with a spurious marker pixel.

In training, a bright pixel in row 0 sits at the column of the digit's class (``marker = label % 8``, the
slice); in the held-out and test data the marker column is random. A linear classifier trained on the biased
data leans on the marker; refitting its layer on held-out data where every (class, marker) cell weighs the
same must lift the worst cells.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_synth.callbacks import SliceBalancedRefit
from lightning_synth.callbacks.slice_refit import cell_balanced_weights, fit_linear_head
from lightning_synth.datasets import load_digits_tensors

NUM_SLICES = 8


def marked(images: Tensor, markers: Tensor) -> Tensor:
    out = images.clone()
    out[torch.arange(len(out)), 0, 0, markers] = 1.0
    return out


def splits() -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    images, labels = load_digits_tensors()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=g)
    parts = {"train": order[:900], "heldout": order[900:1300], "test": order[1300:]}
    out = {}
    for name, idx in parts.items():
        y = labels[idx]
        markers = y % NUM_SLICES if name == "train" else torch.randint(NUM_SLICES, y.shape, generator=g)
        out[name] = (marked(images[idx], markers), y, markers)
    return out


class LinearDigits(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 10))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return torch.nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def heldout_loader(data: dict[str, tuple[Tensor, Tensor, Tensor]]) -> DataLoader:
    x, y, s = data["heldout"]
    return DataLoader(TensorDataset(x, y, s), batch_size=100)  # (x, y, group) batches: slice "group"


def mean_cell_accuracy(model: L.LightningModule, x: Tensor, y: Tensor, s: Tensor) -> float:
    with torch.no_grad():
        hit = (model.eval()(x).argmax(1) == y).float()
    cells = y * NUM_SLICES + s
    return float(torch.stack([hit[cells == c].mean() for c in cells.unique()]).mean())


def train(tkw, data, callbacks=()) -> LinearDigits:
    L.seed_everything(0)
    model = LinearDigits()
    x, y, _ = data["train"]
    trainer = L.Trainer(max_epochs=15, callbacks=list(callbacks), **tkw())
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    return model


def test_bad_arguments_raise() -> None:
    loader = [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(TypeError, match="`dataloader` must be"):
        SliceBalancedRefit(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`steps` must be >= 1"):
        SliceBalancedRefit(loader, steps=0)
    with pytest.raises(ValueError, match="`lr` must be in"):
        SliceBalancedRefit(loader, lr=0.0)
    with pytest.raises(ValueError, match="`weight_decay` must be in"):
        SliceBalancedRefit(loader, weight_decay=-1.0)
    with pytest.raises(TypeError, match="`slice_key` must be"):
        SliceBalancedRefit(loader, slice_key="")
    with pytest.raises(ValueError, match="`dro_step_size` must be in"):
        SliceBalancedRefit(loader, dro_step_size=-0.1)
    with pytest.raises(ValueError, match="`uniform_floor` must be in"):
        SliceBalancedRefit(loader, uniform_floor=1.5)


def test_cell_balanced_weights_give_every_cell_the_same_mass() -> None:
    cells = torch.tensor([0, 0, 0, 0, 5, 7, 7])
    w = cell_balanced_weights(cells)
    assert [float(w[cells == c].sum()) for c in (0, 5, 7)] == pytest.approx([1 / 3] * 3)
    assert float(w.sum()) == pytest.approx(1.0)


def test_fit_linear_head_folds_standardisation_back() -> None:
    x = torch.randn(200, 4) * torch.tensor([1.0, 100.0, 0.01, 1.0]) + 50
    y = (x[:, 2] > 50).long()
    w, b = fit_linear_head(x, y, torch.full((200,), 1 / 200), 2, steps=200, lr=0.1, weight_decay=0.0)
    assert float(((x @ w.T + b).argmax(1) == y).float().mean()) > 0.95


def _hard_cell_problem() -> tuple[Tensor, Tensor, Tensor]:
    """Cell 0 is class 0; class 1 has an easy cell (1, far on x0) and a hard one (2, on class 0's side of x0,
    apart only on x1): weighing the cells the same, the fit leaves cells 0 and 2 worse than cell 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g)
    cells = torch.arange(300) % 3
    x[:, 0] += torch.tensor([-1.5, 1.5, -1.5])[cells]
    x[:, 1] += torch.tensor([-0.7, 0.0, 0.7])[cells]
    return x, (cells > 0).long(), cells


def test_the_tilt_lifts_the_worst_cell_and_a_full_floor_is_plain() -> None:
    x, y, cells = _hard_cell_problem()
    weights = cell_balanced_weights(cells)

    def fit(**tilt: float) -> tuple[float, float, tuple[Tensor, Tensor]]:
        torch.manual_seed(0)
        w, b = fit_linear_head(x, y, weights, 2, steps=300, lr=0.05, weight_decay=0.0, cells=cells, **tilt)
        logits = x @ w.T + b
        loss, correct = F.cross_entropy(logits, y, reduction="none"), (logits.argmax(1) == y).float()
        worst_loss = max(float(loss[cells == c].mean()) for c in range(3))
        return worst_loss, min(float(correct[cells == c].mean()) for c in range(3)), (w, b)

    plain, tilted = fit(), fit(dro_step_size=0.1, uniform_floor=0.5)
    assert tilted[0] < plain[0] - 0.1, (plain[0], tilted[0])  # the worst cell's loss
    assert tilted[1] > plain[1] + 0.05, (plain[1], tilted[1])  # and its accuracy
    for a, b in zip(fit(dro_step_size=0.1, uniform_floor=1.0)[2], plain[2]):  # the floor takes all the weight
        assert torch.allclose(a, b)


def test_refit_lifts_the_worst_cells_after_a_real_fit(tkw) -> None:
    data = splits()
    x, y, s = data["test"]
    plain = train(tkw, data)
    refit = SliceBalancedRefit(lambda: heldout_loader(data), slice_key="group", steps=200, weight_decay=1e-2)
    refitted = train(tkw, data, [refit])
    before, after = mean_cell_accuracy(plain, x, y, s), mean_cell_accuracy(refitted, x, y, s)
    assert after > before + 0.05, (before, after)
    assert refit.summary["samples"] == 400
    assert refit.summary["cells"] == len((data["heldout"][1] * NUM_SLICES + data["heldout"][2]).unique())


def test_refit_is_deterministic_and_keeps_the_body(tkw) -> None:
    data = splits()
    models = [train(tkw, data, [SliceBalancedRefit(lambda: heldout_loader(data), steps=50)]) for _ in range(2)]
    plain = train(tkw, data)
    # Same data, same layer: what makes every DDP rank agree before the broadcast.
    assert torch.equal(models[0].net[-1].weight, models[1].net[-1].weight)
    assert not torch.equal(models[0].net[-1].weight, plain.net[-1].weight)
    assert torch.equal(models[0].net[1].weight, plain.net[1].weight)  # only the last layer is refitted


def test_state_dict_round_trip_and_missing_slice_message(tkw) -> None:
    data = splits()
    refit = SliceBalancedRefit(lambda: heldout_loader(data), steps=5)
    train(tkw, data, [refit])
    other = SliceBalancedRefit(lambda: heldout_loader(data))
    other.load_state_dict(refit.state_dict())
    assert other.summary == refit.summary
    x, y, _ = data["heldout"]
    no_slices = SliceBalancedRefit(DataLoader(TensorDataset(x, y), batch_size=100), steps=5)
    with pytest.raises(KeyError, match="no slice 'group'"):
        train(tkw, data, [no_slices])


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_end_with_the_same_refitted_layer(tmp_path) -> None:
    script = Path(__file__).with_name("ddp_slice_refit_script.py")
    subprocess.run([sys.executable, str(script), str(tmp_path), "2", "ddp"], check=True, timeout=300)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["body"], rank1["body"])
    assert torch.equal(rank0["head"], rank1["head"])

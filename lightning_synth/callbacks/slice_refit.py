"""`SliceBalancedRefit`: at the end of training, refit the last linear layer so that every (class, slice) cell
weighs the same, on slice-labelled held-out data.

A network trained where an attribute (a colour, a background) goes with the class learns features of both; its
last layer leans on the attribute. Refitting only that layer on data where every (class, slice) cell weighs
the same (Deep Feature Reweighting, Kirichenko et al. 2023) makes it lean on what holds in every cell. By default
the refit also tilts the cells' weights towards the cells it fits worst (online Group DRO on the last layer,
Sagawa et al. 2020, with ``dro_step_size``), keeping a ``uniform_floor`` share of the weight spread evenly, so
that the worst cells are not traded for the average. The
refit needs slice-labelled data the network has not fitted: held-out samples of the kind the analyzer reads
its slices from. It pairs with a slice-conditioned GAN in the training loop: the GAN's samples of the weak
(class, slice) cells shape the features, the refit reweighs them.

The maths is in two pure functions, :func:`cell_balanced_weights` and :func:`fit_linear_head`; the callback
reads the data and swaps the layer's weights in place. Under DDP every rank iterates the whole refit loader
itself and fits; rank 0's layer is then broadcast, so every rank ends with the same layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_synth._validation import check_int, check_number
from lightning_synth.batch import BatchAdapter, resolve_batch_adapter

__all__ = ["SliceBalancedRefit", "cell_balanced_weights", "fit_linear_head"]

_CHUNK = 1000


def cell_balanced_weights(cells: Tensor) -> Tensor:
    """Sample weights summing to 1 in which every cell weighs the same.

    Args:
        cells: ``(N,)`` integer cell id of each sample.

    Example:
        >>> [round(v, 3) for v in cell_balanced_weights(torch.tensor([0, 0, 0, 1])).tolist()]
        [0.167, 0.167, 0.167, 0.5]
    """
    _, inverse, counts = cells.unique(return_inverse=True, return_counts=True)
    return 1.0 / (counts[inverse].float() * len(counts))


@torch.enable_grad()
def fit_linear_head(
    features: Tensor, labels: Tensor, weights: Tensor, num_classes: int, steps: int = 300, lr: float = 0.01,
    weight_decay: float = 1e-3, cells: Tensor | None = None, dro_step_size: float = 0.0, uniform_floor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """A linear layer fitted full-batch with Adam on weighted cross-entropy plus ``weight_decay * |W|^2``.

    Features are standardised for the fit and the standardisation is folded back, so the returned layer
    applies to raw features. The layer starts from ``nn.Linear``'s initialisation (the global RNG).

    With ``cells`` and ``dro_step_size > 0``, the loss is a mixture over cells of each cell's weighted mean
    loss: each step the cells' tilts ``q`` are multiplied by ``exp(dro_step_size * cell loss)`` and
    renormalised (online Group DRO), and a cell counts ``(1 - uniform_floor) * q_c + uniform_floor * m_c``,
    where ``m_c`` is its share of ``weights``. ``dro_step_size=0`` (or ``uniform_floor=1``) is the plain
    weighted loss.

    Args:
        features: ``(N, D)`` inputs of the layer.
        labels: ``(N,)`` classes.
        weights: ``(N,)`` non-negative sample weights summing to 1 (e.g. :func:`cell_balanced_weights`).
        num_classes: outputs of the layer.
        steps, lr: full-batch Adam steps and learning rate.
        weight_decay: L2 penalty on the (standardised) weights.
        cells: ``(N,)`` integer cell of each sample, for the tilt.
        dro_step_size: step size of the tilt (0: none).
        uniform_floor: share of the cell weight that stays at the cells' masses, in [0, 1].

    Returns:
        ``(weight (num_classes, D), bias (num_classes,))``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 3); y = (x[:, 0] > 0).long()
        >>> w, b = fit_linear_head(x, y, torch.full((64,), 1 / 64), 2, steps=100, lr=0.1)
        >>> bool(((x @ w.T + b).argmax(1) == y).float().mean() > 0.9)
        True
        >>> w, b = fit_linear_head(x, y, torch.full((64,), 1 / 64), 2, steps=100, lr=0.1,
        ...                        cells=y * 2 + (x[:, 1] > 0).long(), dro_step_size=0.05, uniform_floor=0.5)
        >>> bool(((x @ w.T + b).argmax(1) == y).float().mean() > 0.9)
        True
    """
    tilt = cells is not None and dro_step_size > 0 and uniform_floor < 1
    if tilt:
        assert cells is not None
        _, inverse = cells.to(features.device).unique(return_inverse=True)
        one_hot = F.one_hot(inverse).to(features.dtype) * weights[:, None]  # (N, K): each sample's weight
        mass = one_hot.sum(0)  # each cell's share of the weights
        q = torch.full_like(mass, 1.0 / len(mass))
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    layer = nn.Linear(z.shape[1], num_classes).to(features.device)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        per_sample = F.cross_entropy(layer(z), labels, reduction="none")
        if tilt:
            cell_loss = (one_hot * per_sample[:, None]).sum(0) / mass.clamp_min(1e-12)
            with torch.no_grad():
                q = q * torch.exp(dro_step_size * cell_loss)
                q = q / q.sum()
            loss = (((1.0 - uniform_floor) * q + uniform_floor * mass) * cell_loss).sum()
        else:
            loss = (weights * per_sample).sum()
        loss = loss + weight_decay * layer.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return layer.weight / std, layer.bias - (layer.weight * (mean / std)).sum(1)


class SliceBalancedRefit(Callback):
    """Refit the model's last ``nn.Linear`` at the end of fit, every (class, slice) cell weighing the same.

    Args:
        dataloader: slice-labelled batches (e.g. ``(x, y, group)`` or ``(x, y, {"group": g})``) to refit on,
            or a zero-argument callable returning them (called at the end of fit, when the data is set up).
            Not the training data: held-out samples the network has not fitted.
        slice_key: the slice attribute that, with the class, defines a cell.
        steps: full-batch Adam steps of the refit.
        lr: Adam learning rate of the refit.
        weight_decay: L2 penalty on the refitted weights (on standardised features).
        dro_step_size: step size of the tilt towards the cells fitted worst (online Group DRO on the layer;
            0: every cell weighs the same throughout, plain DFR).
        uniform_floor: share of the weight that stays spread evenly over the cells under the tilt, in [0, 1].
        batch_adapter: how to read ``(inputs, targets, slices)`` from a batch (default: tuples and dicts).

    Attributes:
        summary: after the refit, ``{"cells", "samples"}``.

    Raises:
        TypeError: if ``dataloader`` or ``slice_key`` has the wrong type, or a number is not one.
        ValueError: if a number is out of range.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
        >>> refit = SliceBalancedRefit(DataLoader(TensorDataset(x, y, torch.arange(40) % 4), batch_size=16))
        >>> class Tiny(L.LightningModule):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
        ...     def forward(self, images: Tensor) -> Tensor:
        ...         return self.net(images)
        >>> refit.on_fit_end(L.Trainer(accelerator="cpu", logger=False), Tiny())  # what `fit` ends with
        >>> refit.summary
        {'cells': 4.0, 'samples': 40.0}
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        slice_key: str = "group",
        steps: int = 300,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        dro_step_size: float = 0.01,
        uniform_floor: float = 0.5,
        batch_adapter: BatchAdapter | Callable[[Any], Any] | None = None,
    ) -> None:
        if not (callable(dataloader) or isinstance(dataloader, Iterable)):
            raise TypeError(f"`dataloader` must be an iterable of batches or a callable returning one, got "
                            f"{type(dataloader).__name__}")
        if not isinstance(slice_key, str) or not slice_key:
            raise TypeError(f"`slice_key` must be a non-empty string, got {slice_key!r}")
        check_int("steps", steps, 1)
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("dro_step_size", dro_step_size, low=0.0)
        check_number("uniform_floor", uniform_floor, low=0.0, high=1.0)
        self.dataloader, self.slice_key = dataloader, slice_key
        self.steps, self.lr, self.weight_decay = steps, float(lr), float(weight_decay)
        self.dro_step_size, self.uniform_floor = float(dro_step_size), float(uniform_floor)
        self.batch_adapter = resolve_batch_adapter(batch_adapter)
        self.summary: dict[str, float] = {}

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        head = _last_linear(pl_module)
        inputs, labels, slices = self._read()
        feats = _head_inputs(pl_module, head, inputs)
        cells = labels * (int(slices.max()) + 1) + slices
        weights = cell_balanced_weights(cells).to(feats.device)
        weight, bias = fit_linear_head(feats, labels.to(feats.device), weights, head.out_features, self.steps,
                                       self.lr, self.weight_decay, cells=cells, dro_step_size=self.dro_step_size,
                                       uniform_floor=self.uniform_floor)
        # Rank 0's layer for every rank: the loaders' orders (and so float sums) may differ across ranks.
        weight, bias = trainer.strategy.broadcast((weight, bias), src=0)
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            if head.bias is not None:
                head.bias.copy_(bias.to(head.bias))
        self.summary = {"cells": float(len(cells.unique())), "samples": float(len(labels))}

    def state_dict(self) -> dict[str, Any]:
        return {"summary": dict(self.summary)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.summary = dict(state_dict.get("summary", {}))

    # ---------------------------------------------------------------------------------------- internals
    def _read(self) -> tuple[Tensor, Tensor, Tensor]:
        loader = self.dataloader() if callable(self.dataloader) else self.dataloader
        inputs, labels, slices = [], [], []
        for batch in loader:
            view = self.batch_adapter.unpack(batch)
            if self.slice_key not in view.slices:
                raise KeyError(f"The refit batches have no slice {self.slice_key!r}; slices present: "
                               f"{sorted(view.slices)}. Pass batches (x, y, {{{self.slice_key!r}: values}}).")
            inputs.append(view.inputs.cpu())
            labels.append(view.targets.long().cpu())
            slices.append(view.slices[self.slice_key].long().cpu())
        if not inputs:
            raise RuntimeError("The refit dataloader gave no batches.")
        return torch.cat(inputs), torch.cat(labels), torch.cat(slices)


def _last_linear(module: nn.Module) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"SliceBalancedRefit refits the last nn.Linear of the model; {type(module).__name__} has none")
    return linears[-1]


@torch.no_grad()
def _head_inputs(module: L.LightningModule, head: nn.Linear, inputs: Tensor) -> Tensor:
    """What ``head`` receives when ``module`` (in eval mode) runs on ``inputs``, chunk by chunk."""
    captured: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    was_training = module.training
    module.eval()
    try:
        for part in inputs.split(_CHUNK):
            module(part.to(module.device))
    finally:
        handle.remove()
        module.train(was_training)
    return torch.cat(captured)

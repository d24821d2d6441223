"""`SliceBalancedRefit`: at the end of training, refit the last linear layer so that every (class, slice) cell
weighs the same, on slice-labelled held-out data topped up with GAN samples where a cell is thin.

A network trained where an attribute (a colour, a background) goes with the class learns features of both; its
last layer leans on the attribute. Refitting only that layer on data where every (class, slice) cell weighs
the same (Deep Feature Reweighting, Kirichenko et al. 2023) makes it lean on what holds in every cell. The
refit needs slice-labelled data: the held-out samples the user has (the same kind of data the analyzer reads
its slices from). Where a cell has few or no real samples, a slice-conditioned
:class:`~lightning_synth.generators.ConditionalGAN` composes more (class and slice have separate embeddings,
so a cell absent from training can be asked for).

The maths is in two pure functions, :func:`cell_balanced_weights` and :func:`fit_linear_head`; the callback
reads the data, draws the GAN samples and swaps the layer's weights in place. Under DDP every rank iterates
the whole refit loader itself and draws the same GAN samples (a generator seeded by ``seed``); rank 0's
result is then broadcast, so every rank ends with the same layer.
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
from lightning_synth.generators.gan import ConditionalGAN
from lightning_synth.value_range import ValueRange

__all__ = ["SliceBalancedRefit", "cell_balanced_weights", "fit_linear_head"]

_CHUNK = 1000


def cell_balanced_weights(cells: Tensor, synthetic: Tensor, synthetic_weight: float = 1.0) -> Tensor:
    """Sample weights summing to 1 in which every cell weighs the same.

    Args:
        cells: ``(N,)`` integer cell id of each sample.
        synthetic: ``(N,)`` bool, True for generated samples.
        synthetic_weight: weight of a generated sample relative to a real one of its cell.

    Example:
        >>> w = cell_balanced_weights(torch.tensor([0, 0, 0, 1]), torch.tensor([False, False, True, False]), 0.5)
        >>> [round(v, 3) for v in w.tolist()]
        [0.2, 0.2, 0.1, 0.5]
    """
    raw = torch.where(synthetic, float(synthetic_weight), 1.0).double()
    ids, inverse = cells.unique(return_inverse=True)
    per_cell = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, raw)
    weights = raw / per_cell[inverse] / len(ids)
    return weights.float()


@torch.enable_grad()
def fit_linear_head(
    features: Tensor, labels: Tensor, weights: Tensor, num_classes: int, steps: int = 300, lr: float = 0.01,
    weight_decay: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """A linear layer fitted full-batch with Adam on weighted cross-entropy plus ``weight_decay * |W|^2``.

    Features are standardised for the fit and the standardisation is folded back, so the returned layer
    applies to raw features. The layer starts from ``nn.Linear``'s initialisation (the global RNG).

    Returns:
        ``(weight (num_classes, D), bias (num_classes,))``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 3); y = (x[:, 0] > 0).long()
        >>> w, b = fit_linear_head(x, y, torch.full((64,), 1 / 64), 2, steps=100, lr=0.1)
        >>> bool(((x @ w.T + b).argmax(1) == y).float().mean() > 0.9)
        True
    """
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    layer = nn.Linear(z.shape[1], num_classes).to(features.device)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        loss = (weights * F.cross_entropy(layer(z), labels, reduction="none")).sum()
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
        gan: a slice-conditioned GAN (``num_slices > 0``) that tops up cells with fewer than ``min_per_cell``
            real samples; ``None``: real samples only.
        min_per_cell: GAN samples are drawn until each cell has this many samples (0: none drawn).
        slice_cells: when ``gan.slice_key`` differs from ``slice_key``: a ``(num_values, 2)`` table giving the
            GAN's ``(class, slice)`` condition of each value of ``slice_key`` (see
            :func:`~lightning_synth.generators.gan_generator.cells_from_data`). Its rows also add the cells
            that no real sample has. With the GAN conditioned on ``slice_key`` itself, no table is needed.
        class_check: keep only GAN samples whose class the GAN's auxiliary head predicts.
        synthetic_weight: weight of a GAN sample relative to a real one of its cell.
        steps: full-batch Adam steps of the refit.
        lr: Adam learning rate of the refit.
        weight_decay: L2 penalty on the refitted weights (on standardised features).
        seed: seed of the GAN samples (the same on every rank).
        batch_adapter: how to read ``(inputs, targets, slices)`` from a batch (default: tuples and dicts).

    Attributes:
        summary: after the refit, ``{"cells", "real", "synthetic", "rejected", "loss"}``.

    Raises:
        TypeError / ValueError: if an argument has the wrong type or range.

    Example:
        >>> from lightning_synth.datasets import DigitsDataModule
        >>> dm = DigitsDataModule(batch_size=64)
        >>> dm.setup("fit")
        >>> refit = SliceBalancedRefit(lambda: dm.val_dataloader(), slice_key="group", steps=5)
        >>> refit.min_per_cell, refit.gan is None
        (0, True)
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        slice_key: str = "group",
        gan: ConditionalGAN | None = None,
        min_per_cell: int = 0,
        slice_cells: Tensor | None = None,
        class_check: bool = True,
        synthetic_weight: float = 1.0,
        steps: int = 300,
        lr: float = 0.01,
        weight_decay: float = 1e-3,
        seed: int = 0,
        batch_adapter: BatchAdapter | Callable[[Any], Any] | None = None,
    ) -> None:
        if not (callable(dataloader) or isinstance(dataloader, Iterable)):
            raise TypeError(f"`dataloader` must be an iterable of batches or a callable returning one, got "
                            f"{type(dataloader).__name__}")
        if not isinstance(slice_key, str) or not slice_key:
            raise TypeError(f"`slice_key` must be a non-empty string, got {slice_key!r}")
        if gan is not None and not isinstance(gan, ConditionalGAN):
            raise TypeError(f"`gan` must be a ConditionalGAN or None, got {type(gan).__name__}")
        if gan is not None and gan.num_slices == 0:
            raise ValueError("`gan` must be slice-conditioned (`num_slices > 0`), got `num_slices=0`")
        check_int("min_per_cell", min_per_cell, 0)
        check_int("steps", steps, 1)
        check_int("seed", seed, 0)
        check_number("synthetic_weight", synthetic_weight, low=0.0, low_open=True)
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        table = None if slice_cells is None else torch.as_tensor(slice_cells).long()
        if table is not None and (table.ndim != 2 or table.shape[1] != 2):
            raise ValueError(f"`slice_cells` must have shape (num_values, 2), got {tuple(table.shape)}")
        if gan is not None and gan.slice_key != slice_key and table is None:
            raise ValueError(f"The GAN is conditioned on {gan.slice_key!r}, not `slice_key={slice_key!r}`: pass "
                             "`slice_cells` mapping each value to the GAN's (class, slice) condition")
        self.dataloader, self.slice_key, self.gan, self.min_per_cell = dataloader, slice_key, gan, min_per_cell
        self.slice_cells, self.class_check, self.synthetic_weight = table, bool(class_check), float(synthetic_weight)
        self.steps, self.lr, self.weight_decay, self.seed = steps, float(lr), float(weight_decay), seed
        self.batch_adapter = resolve_batch_adapter(batch_adapter)
        self.summary: dict[str, float] = {}

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        head = _last_linear(pl_module)
        inputs, labels, slices = self._read()
        feats = _head_inputs(pl_module, head, inputs)
        stride = max(int(slices.max()) + 1, 0 if self.slice_cells is None else len(self.slice_cells))
        cells = labels * stride + slices
        synthetic = torch.zeros(len(labels), dtype=torch.bool)
        rejected = 0
        if self.gan is not None and self.min_per_cell > 0:
            images, syn_labels, syn_cells, rejected = self._gan_top_up(labels, slices, stride,
                                                                     ValueRange.detect(inputs))
            if len(images):
                feats = torch.cat([feats, _head_inputs(pl_module, head, images)])
                labels, cells = torch.cat([labels, syn_labels]), torch.cat([cells, syn_cells])
                synthetic = torch.cat([synthetic, torch.ones(len(images), dtype=torch.bool)])
        weights = cell_balanced_weights(cells, synthetic, self.synthetic_weight).to(feats.device)
        weight, bias = fit_linear_head(feats, labels.to(feats.device), weights, head.out_features, self.steps,
                                       self.lr, self.weight_decay)
        # Rank 0's layer for every rank: the loaders' orders (and so float sums) may differ across ranks.
        weight, bias = trainer.strategy.broadcast((weight, bias), src=0)
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            if head.bias is not None:
                head.bias.copy_(bias.to(head.bias))
        self.summary = {"cells": float(len(cells.unique())), "real": float((~synthetic).sum()),
                        "synthetic": float(synthetic.sum()), "rejected": float(rejected)}

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

    def _gan_cells(self, labels: Tensor, slices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each cell as ``(class, slice value, GAN slice)``: those with real samples, and the table's rows."""
        pairs = torch.stack([labels, slices], 1).unique(dim=0)
        if self.slice_cells is None:
            return pairs[:, 0], pairs[:, 1], pairs[:, 1]
        table = self.slice_cells
        rows = (table[:, 0] >= 0).nonzero().squeeze(1)
        pairs = torch.cat([pairs, torch.stack([table[rows, 0], rows], 1)]).unique(dim=0)
        values = pairs[:, 1].clamp(0, len(table) - 1)
        known = (pairs[:, 1] < len(table)) & (table[values, 0] == pairs[:, 0])
        pairs, values = pairs[known], values[known]
        return pairs[:, 0], pairs[:, 1], table[values, 1]

    def _gan_top_up(
        self, labels: Tensor, slices: Tensor, stride: int, value_range: ValueRange
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """GAN samples for the cells under ``min_per_cell``: ``(inputs, labels, cell ids, rejected)``."""
        gan = self.gan
        assert gan is not None
        classes, values, gan_slices = self._gan_cells(labels, slices)
        have = torch.tensor([int(((labels == c) & (slices == v)).sum()) for c, v in zip(classes, values)],
                            dtype=torch.long)
        need = (self.min_per_cell - have).clamp_min(0)
        cell_ids = classes * stride + values
        want_c, want_s, want_cell = (t.repeat_interleave(need) for t in (classes, gan_slices, cell_ids))
        generator = torch.Generator().manual_seed(self.seed)
        images = []
        for part in torch.arange(len(want_c)).split(_CHUNK):
            images.append(gan.sample(want_c[part], torch.full((len(part),), gan.clean_index), generator=generator,
                                     slices=want_s[part]).cpu())
        if not images:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0
        samples = torch.cat(images)
        keep = torch.ones(len(samples), dtype=torch.bool)
        if self.class_check:
            keep = torch.cat([gan.classify(p).argmax(1).cpu() for p in samples.split(_CHUNK)]) == want_c
        return value_range.from_unit(samples[keep]), want_c[keep], want_cell[keep], int((~keep).sum())


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

"""Irreducible-loss estimates for reducible-loss sampling (RHO-LOSS, Mindermann et al. 2022).

A sample's *reducible* loss is its training loss minus what a model that never trained on it still gets
wrong: the loss under the same architecture trained only on held-out data. Over-corrupted or ambiguous
images keep a high loss under both, so their reducible loss is small and they stop soaking up the sampler's
mass; images the model has simply not learned yet keep a large one.

:class:`IrreducibleLoss` holds its own parameters and buffers for the task module and runs the task module
with them through :func:`torch.func.functional_call`: no copy of the module, its hooks or its trainer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from lightning_synth._validation import check_int, check_number
from lightning_synth.batch import BatchAdapter, BatchView
from lightning_synth.consistency import MixingChains
from lightning_synth.value_range import ValueRange

__all__ = ["IrreducibleLoss"]


class IrreducibleLoss:
    """The task model's architecture with its own weights, trained on held-out data only.

    :meth:`fit` starts from freshly initialised weights (every submodule's ``reset_parameters``, seeded; the
    task module's own weights are restored afterwards) and trains them with Adam on the held-out batches,
    ``perturbed_share`` of each batch passed through one random operation of the perturbation bank at a
    severity drawn uniformly in ``[0.5, max_severity]``, so that the estimate covers the perturbed images
    the synthetic pool holds. :meth:`__call__` gives per-sample cross-entropy under those weights.

    Args:
        epochs: passes over the held-out batches.
        lr: Adam learning rate.
        perturbed_share: share of each held-out batch perturbed by the bank.
        perturbations: registered perturbation names; ``None`` means the default bank.
        max_severity: severities are drawn uniformly in ``[0.5, max_severity]``.
        seed: seeds the initialisation and the perturbations (the same on every rank, so every rank gets the
            same weights from the same batches).

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> batches = [(torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,)))]
        >>> il = IrreducibleLoss(epochs=2, perturbations=["gaussian_noise"])
        >>> il.fit(model, batches)
        >>> tuple(il(model, torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])).shape)
        (3,)
    """

    def __init__(
        self,
        epochs: int = 2,
        lr: float = 1e-3,
        perturbed_share: float = 0.5,
        perturbations: Sequence[str] | None = None,
        max_severity: float = 5.0,
        seed: int = 0,
    ) -> None:
        check_int("epochs", epochs, 1)
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("perturbed_share", perturbed_share, low=0.0, high=1.0)
        check_int("seed", seed, 0)
        self.epochs, self.lr, self.perturbed_share, self.seed = epochs, float(lr), float(perturbed_share), seed
        self.chains = MixingChains(perturbations, max_depth=1, max_severity=max_severity, floor=1.0)
        self.state: dict[str, Tensor] | None = None

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load_state_dict`) has given it weights."""
        return self.state is not None

    def fit(self, module: nn.Module, batches: Iterable[Any], batch_adapter: BatchAdapter | None = None) -> None:
        """Train fresh weights for ``module``'s architecture on ``batches`` (``(inputs, targets)`` or what
        ``batch_adapter`` reads), leaving ``module``'s own weights and mode as they were.

        Raises:
            ValueError: if ``batches`` is empty.
        """
        adapter = batch_adapter or BatchAdapter()
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        was_training = module.training
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                for sub in module.modules():
                    reset = getattr(sub, "reset_parameters", None)
                    if callable(reset):
                        reset()
                fresh = {k: v.detach().clone() for k, v in module.state_dict().items()}
                trainable = [fresh[name].requires_grad_() for name, _ in module.named_parameters() if name in fresh]
                optimizer = torch.optim.Adam(trainable, lr=self.lr)
                module.train()
                seen = 0
                for _ in range(self.epochs):
                    for batch in batches:
                        view = adapter.unpack(batch)
                        inputs, targets = self._perturb(view.inputs), view.targets
                        device = trainable[0].device if trainable else inputs.device
                        logits = functional_call(module, fresh, (inputs.to(device),))
                        loss = F.cross_entropy(logits.float(), targets.to(device))
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        seen += 1
                if seen == 0:
                    raise ValueError("`batches` must hold at least one held-out batch, got none")
        finally:
            module.load_state_dict(own)
            module.train(was_training)
        self.state = {k: v.detach() for k, v in fresh.items()}

    def _perturb(self, inputs: Tensor) -> Tensor:
        n = round(self.perturbed_share * len(inputs))
        if n == 0:
            return inputs
        value_range = ValueRange.detect(inputs)
        out = inputs.clone()
        out[:n] = value_range.from_unit(self.chains.chain(value_range.to_unit(inputs[:n]).float())).to(inputs.dtype)
        return out

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample cross-entropy ``(B,)`` of ``module``'s architecture with the held-out weights (eval mode).

        Raises:
            RuntimeError: before :meth:`fit`.
        """
        if self.state is None:
            raise RuntimeError("IrreducibleLoss has no weights yet: call `fit` on held-out data first")
        was_training = module.training
        module.eval()
        try:
            device = next(iter(self.state.values())).device
            logits = functional_call(module, self.state, (inputs.to(device),))
        finally:
            module.train(was_training)
        return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")

    def fit_heldout(self, module: nn.Module, datamodule: Any, batch_adapter: BatchAdapter | None = None) -> None:
        """:meth:`fit` on ``datamodule.val_dataloader()``, the held-out data a Lightning project already has.

        Raises:
            RuntimeError: if there is no datamodule or its ``val_dataloader()`` is not one DataLoader.
        """
        holdout = datamodule.val_dataloader() if datamodule is not None else None
        if not isinstance(holdout, DataLoader):
            raise RuntimeError("IrreducibleLoss trains its model on held-out data: fit with a datamodule whose "
                               f"`val_dataloader()` returns one DataLoader; got {type(holdout).__name__}.")
        self.fit(module, holdout, batch_adapter)

    def subtract(self, module: nn.Module, losses: Tensor, view: BatchView, store: Tensor, rows: Tensor) -> Tensor:
        """``losses - irreducible losses`` of a batch ``view`` whose rows are dataset indices ``rows``; estimates
        are read from ``store`` (e.g. :attr:`AdaptiveSampler.irreducible_losses`), computed here for rows where it
        holds NaN and written back, so each sample costs one forward under the held-out weights."""
        inputs, targets = view.inputs, view.targets
        stored = store[rows]
        missing = torch.isnan(stored).nonzero().squeeze(1)
        if missing.numel():
            fresh = self(module, inputs[missing.to(inputs.device)], targets[missing.to(targets.device)])
            stored[missing] = store[rows[missing]] = fresh.to("cpu", store.dtype)
        return losses - stored.to(losses.device, losses.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The held-out weights (``None`` before :meth:`fit`)."""
        return {"state": None if self.state is None else {k: v.clone() for k, v in self.state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        state = state_dict["state"]
        self.state = None if state is None else {k: torch.as_tensor(v).clone() for k, v in state.items()}

"""Exploration plugin (issue 10, session 11): the mixing chains' severities drawn around each op's frontier.

``python -m benchmarks.robustness --plugins benchmarks.explore_severity --methods lightning_synth ls_front50
ls_front100 --splits val ...`` compares the defaults with two variants whose :class:`MixingChains` draw a share
of their severities (50% or all) uniformly within one level of the operation's frontier in the newest profile
(the level where its accuracy gap reaches the analyzer's threshold); operations without a frontier keep
uniform severities. Everything else is the ``lightning_synth`` row. Not adopted: on the validation corruptions
(seeds 0-2) neither variant was above the defaults (README, "What was tried").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from benchmarks.common import Method, register_method
from benchmarks.methods import lightning_synth_method
from lightning_synth.consistency import MixingChains
from lightning_synth.profile import WeaknessProfile


class FrontierChains(MixingChains):
    """:class:`MixingChains` whose severities follow each operation's frontier for a ``band_share`` of draws."""

    band_share = 0.5

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.front = torch.full((len(self.bank),), float("nan"))

    def update(self, profile: WeaknessProfile) -> None:
        super().update(profile)
        fronts = [profile.frontier.get(n) for n in self.bank.names]
        self.front = torch.tensor([float("nan") if f is None else f for f in fronts])

    def severities(self, ops: Tensor) -> Tensor:
        levels = super().severities(ops).cpu()
        front = self.front[ops.cpu()]
        band = ~front.isnan() & (torch.rand(len(ops)) < self.band_share)
        low, high = (front - 1.0).clamp(0.5, self.max_severity), (front + 1.0).clamp(0.5, self.max_severity)
        return torch.where(band, low + torch.rand(len(ops)) * (high - low), levels).to(ops.device)


def variant(name: str, band_share: float) -> Method:
    """The ``lightning_synth`` row with :class:`FrontierChains` at ``band_share``."""
    chains: type[MixingChains] = type(f"FrontierChains{int(100 * band_share)}", (FrontierChains,),
                                      {"band_share": band_share})
    return lightning_synth_method(name, gan=False, consistency=True, chains_class=chains,
                                  description=f"{name}: frontier band")


register_method(variant("ls_front50", 0.5), overwrite=True)
register_method(variant("ls_front100", 1.0), overwrite=True)

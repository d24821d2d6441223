"""Exploration plugin (issue 10, session 17): does targeting pay when the synthetic budget covers the bank thinly?

At the defaults' budget (a third of the training set, pool twice that) the bank at random gives each of its 45
(perturbation, severity) cells about 74 samples per refresh of 10k images, and targeting is level with it (36
seeds on the test corruptions); pure targeting lost 3-4 points to it on the validation corruptions. With a small
budget uniform draws cover each cell with a handful of samples, so concentrating them where the profile shows
the model failing might pay. These rows isolate the pool's targeting: no consistency objective, uniform draws
from the sampler (so the only difference within a pair is which perturbations the pool's samples carry), and,
with the small budget, a synthetic weight starting at 0.1 (it then follows the weighting's feedback as usual),
so that a small pool is not repeated many times per epoch.

- ``pool_small_targeted``: ``TargetedAugmentation(uniform_floor=0)`` (every sample at the profile's weak cells),
  budget 5% of the training set, synthetic weight 0.1.
- ``pool_small_uniform``: the same with the bank at random.
- ``pool_third_targeted`` / ``pool_third_uniform``: the same pair at the defaults' budget and weight.

Run: ``python -m benchmarks.robustness --plugins benchmarks.methods benchmarks.explore_budget --methods
pool_small_targeted pool_small_uniform pool_third_targeted pool_third_uniform --splits val --seeds 0 ...``.
"""

from __future__ import annotations

from benchmarks.common import register_method
from benchmarks.methods import lightning_synth_method

_KINDS = {"targeted": ({"uniform_floor": 0.0}, "pure perturbation targeting"),
          "uniform": ({"targeted": False}, "the bank at random")}

for _name, _budget, _weight in (("pool_small", 0.05, 0.1), ("pool_third", 1 / 3, 0.75)):
    for _kind, (_options, _what) in _KINDS.items():
        register_method(lightning_synth_method(
            f"{_name}_{_kind}", gan=False, adaptive=False, budget_fraction=_budget, weight=_weight, **_options,
            description=f"{_name}_{_kind}: {_what}, budget {_budget:.3g}, weight {_weight}, uniform draws, "
                        "no consistency"), overwrite=True)

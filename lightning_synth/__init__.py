"""lightning_synth: find how a Lightning model fails, then make and weigh training data aimed at it."""

from lightning_synth.batch import BatchAdapter, BatchView
from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback, SynthesisCallback
from lightning_synth.consistency import MixingChains, jsd_consistency
from lightning_synth.control import SynthesisController, SynthesisSettings
from lightning_synth.data import AdaptiveSampler, SyntheticPool, SyntheticWeighting
from lightning_synth.datamodule import SyntheticDataModule, attach
from lightning_synth.engine import SynthesisEngine
from lightning_synth.generators import (
    ConditionalGAN,
    ConditionalGANGenerator,
    ScenarioGenerator,
    SyntheticGenerator,
    TargetedAugmentation,
)
from lightning_synth.irreducible import IrreducibleLoss
from lightning_synth.perturbations import Perturbation, PerturbationBank, default_bank, register_perturbation
from lightning_synth.profile import Weakness, WeaknessProfile

__version__ = "0.1.0"

__all__ = [
    "AdaptiveSampler",
    "AdaptiveSampling",
    "BatchAdapter",
    "BatchView",
    "ConditionalGAN",
    "ConditionalGANGenerator",
    "FailureModeCallback",
    "IrreducibleLoss",
    "MixingChains",
    "Perturbation",
    "PerturbationBank",
    "ScenarioGenerator",
    "SynthesisCallback",
    "SynthesisController",
    "SynthesisEngine",
    "SynthesisSettings",
    "SyntheticDataModule",
    "SyntheticGenerator",
    "SyntheticPool",
    "SyntheticWeighting",
    "TargetedAugmentation",
    "Weakness",
    "WeaknessProfile",
    "__version__",
    "attach",
    "default_bank",
    "jsd_consistency",
    "register_perturbation",
]

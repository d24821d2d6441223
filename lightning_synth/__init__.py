"""lightning_synth: find how a Lightning model fails, then make and weigh training data aimed at it."""

from lightning_synth.batch import BatchAdapter, BatchView
from lightning_synth.callbacks import FailureModeCallback
from lightning_synth.perturbations import Perturbation, PerturbationBank, default_bank, register_perturbation
from lightning_synth.profile import Weakness, WeaknessProfile

__version__ = "0.1.0"

__all__ = [
    "BatchAdapter",
    "BatchView",
    "FailureModeCallback",
    "Perturbation",
    "PerturbationBank",
    "Weakness",
    "WeaknessProfile",
    "__version__",
    "default_bank",
    "register_perturbation",
]

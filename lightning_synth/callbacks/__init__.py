"""Lightning callbacks of lightning_synth."""

from lightning_synth.callbacks.adaptive_sampling import AdaptiveSampling
from lightning_synth.callbacks.failure_mode import FailureModeCallback
from lightning_synth.callbacks.slice_refit import SliceBalancedRefit
from lightning_synth.callbacks.synthesis import SynthesisCallback

__all__ = ["AdaptiveSampling", "FailureModeCallback", "SliceBalancedRefit", "SynthesisCallback"]

"""Lightning callbacks of lightning_synth."""

from lightning_synth.callbacks.failure_mode import FailureModeCallback

__all__ = ["FailureModeCallback"]

"""Runtime control of synthesis: one validated settings object for Python, LightningCLI and HTTP.

- :mod:`~lightning_synth.control.settings`: :class:`SynthesisSettings` (the knobs) and :class:`SettingsPatch`.
- :mod:`~lightning_synth.control.queue`: :class:`ChangeQueue`, changes validated when queued and applied on every
  rank at an epoch boundary through ``comm.broadcast``; bounded in count and bytes.
- :mod:`~lightning_synth.control.status`: :class:`StatusBoard`, what the loop publishes and the change history.
- :mod:`~lightning_synth.control.controller`: :class:`SynthesisController`, the one handle on both.
- :mod:`~lightning_synth.control.server`: :class:`ControlServer`, the HTTP API (FastAPI + uvicorn).
- :mod:`~lightning_synth.control.errors`: the errors, and the exception policy they follow.
"""

from typing import TYPE_CHECKING, Any

from lightning_synth.control.controller import SynthesisController
from lightning_synth.control.errors import QueueFullError, ServerStartError, SettingsError
from lightning_synth.control.queue import ChangeQueue, PendingPatch, QueueView, SettingsChange
from lightning_synth.control.settings import SettingsPatch, SynthesisSettings, check_generator_mix
from lightning_synth.control.status import StatusBoard

if TYPE_CHECKING:
    from lightning_synth.control.server import ControlServer, create_app

__all__ = [
    "ChangeQueue",
    "ControlServer",
    "PendingPatch",
    "QueueFullError",
    "QueueView",
    "ServerStartError",
    "SettingsChange",
    "SettingsError",
    "SettingsPatch",
    "StatusBoard",
    "SynthesisController",
    "SynthesisSettings",
    "check_generator_mix",
    "create_app",
]


def __getattr__(name: str) -> Any:
    """The server (FastAPI, uvicorn) is imported on first use: training without the API does not pay for it."""
    if name in ("ControlServer", "create_app"):
        from lightning_synth.control import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

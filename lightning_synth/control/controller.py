"""`SynthesisController`: one handle on the change queue and the status board, for the loop and the server.

Wiring, in the synthesis loop::

    controller = SynthesisController(settings, known_generators=[g.name for g in generators])
    # fit start, global rank 0 only (the server is not picklable: start it in the worker, not in __init__)
    server = ControlServer(controller, host="127.0.0.1", port=0, token=None).start()
    # train epoch start, on EVERY rank (a collective through comm.broadcast, e.g. trainer.strategy)
    for line in controller.sync(trainer.strategy, epoch=trainer.current_epoch, step=trainer.global_step):
        rank_zero_info(line)
    settings = controller.settings  # then: paused, generator_budgets(), effective_profile(), resolve_weight()
    # whenever the profile, pool, sampler or weighting change
    controller.publish(profile=profile, pool={...}, sampler={...}, weighting={...}, epoch=trainer.current_epoch)
    # checkpoints: controller.state_dict() / controller.load_state_dict(state); on every exit: server.stop()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from lightning_synth.control.queue import ChangeQueue, Comm, PendingPatch, SettingsChange, comm_rank
from lightning_synth.control.settings import SettingsPatch, SynthesisSettings
from lightning_synth.control.status import StatusBoard

__all__ = ["SynthesisController"]

log = logging.getLogger("lightning_synth.control")


class SynthesisController:
    """Applied settings, a bounded queue of changes and a status board, kept identical across ranks.

    Changes (:meth:`update`, :meth:`apply_patch`, the HTTP API) are validated at once against the settings
    they will be merged into, and queued (:class:`~lightning_synth.control.queue.ChangeQueue`). :meth:`sync`,
    called by every rank at the same epoch boundary, applies global rank 0's queue on every rank and records
    what changed in the history (:class:`~lightning_synth.control.status.StatusBoard`).

    Args:
        settings: initial settings (defaults when ``None``).
        known_generators: generator names that ``generator_mix`` may use; ``None`` accepts any name.
        max_history: how many change events to keep (and checkpoint).
        max_pending: how many changes may wait for the next :meth:`sync`; more raise ``QueueFullError``.
        max_pending_bytes: how many bytes of changes (as JSON) may wait; more raise ``QueueFullError``.

    Raises:
        TypeError: ``settings`` is not a :class:`SynthesisSettings`, or a bound is not an int.
        ValueError: a bound is too small, bad ``known_generators``, or a mix naming unknown generators.

    Example:
        >>> controller = SynthesisController(known_generators=["augment", "gan"])
        >>> controller.update(synthetic_budget=512, generator_mix={"gan": 1.0}).synthetic_budget
        512
        >>> controller.settings.synthetic_budget  # applied at the next epoch boundary
        2048
        >>> [line.split(" (by")[0] for line in controller.sync()]
        ['synthetic_budget 2048 -> 512', 'generator_mix {} -> {"gan": 1.0}']
        >>> controller.settings.synthetic_budget
        512
    """

    def __init__(
        self,
        settings: SynthesisSettings | None = None,
        known_generators: Sequence[str] | None = None,
        max_history: int = 1000,
        max_pending: int = 1000,
        max_pending_bytes: int = 4 << 20,
    ) -> None:
        self.queue = ChangeQueue(settings, known_generators, max_pending, max_pending_bytes)
        self.board = StatusBoard(max_history)

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def settings(self) -> SynthesisSettings:
        """A copy of the applied settings (change them with :meth:`update`, not by assignment)."""
        return self.queue.settings

    @property
    def effective(self) -> SynthesisSettings:
        """The settings as they will be after the next :meth:`sync` (applied + queued changes)."""
        return self.queue.effective

    @property
    def pending(self) -> list[PendingPatch]:
        """A summary of each queued change."""
        return self.queue.view().items

    @property
    def history(self) -> list[SettingsChange]:
        return self.board.history

    @property
    def known_generators(self) -> tuple[str, ...] | None:
        return self.queue.known_generators

    @known_generators.setter
    def known_generators(self, names: Sequence[str] | None) -> None:
        self.queue.known_generators = names

    # -- writing ------------------------------------------------------------------------------------------
    def update(self, *, source: str = "python", **changes: Any) -> SynthesisSettings:
        """Queue ``changes`` (setting name -> value); returns the settings they will lead to.

        Raises:
            SettingsError: (a ``ValueError``) naming each bad or unknown field.
            QueueFullError: the queue is full (by count or by bytes) until the next :meth:`sync`.
        """
        return self.queue.submit(changes, source)

    def apply_patch(
        self, patch: SettingsPatch | Mapping[str, Any], *, source: str = "python"
    ) -> SynthesisSettings:
        """Validate ``patch`` against the current settings plus the queue, then queue it."""
        return self.queue.submit(patch, source)

    def sync(self, comm: Comm | None = None, *, epoch: int | None = None, step: int | None = None) -> list[str]:
        """Apply queued changes at an epoch boundary; returns one message per change, for logging.

        Args:
            comm: anything with ``broadcast(obj, src=0)`` (``trainer.strategy``, the engine's comm layer): call
                ``sync`` on every rank at the same point, and every rank adopts global rank 0's result.
                ``None`` merges the local queue (a single process).
            epoch: stamped on the recorded changes.
            step: stamped on the recorded changes.

        A change that can no longer be applied is dropped, logged at ERROR and recorded as ``rejected``.
        """
        events = self.queue.sync(comm, epoch=epoch, step=step)
        self.board.record(events)
        if comm_rank(comm) == 0:
            for event in events:
                if event.status == "rejected":
                    log.error("lightning_synth control: %s", event.message)
                else:
                    log.info("lightning_synth control: %s", event.message)
        return [e.message for e in events]

    # -- status board -------------------------------------------------------------------------------------
    def publish(
        self,
        *,
        profile: BaseModel | Mapping[str, Any] | None = None,
        pool: Mapping[str, Any] | None = None,
        sampler: Mapping[str, Any] | None = None,
        weighting: Mapping[str, Any] | None = None,
        epoch: int | None = None,
    ) -> None:
        """Post the latest state of each part (see :meth:`StatusBoard.publish`)."""
        self.board.publish(profile=profile, pool=pool, sampler=sampler, weighting=weighting, epoch=epoch)

    def section(self, name: str) -> dict[str, Any] | None:
        """The last published entry ``{"epoch", "updated_at", "data"}`` of a section, or ``None``."""
        return self.board.section(name)

    def status(self, history: int = 20) -> dict[str, Any]:
        """A JSON-ready snapshot: applied and effective settings, the queue summary, recent changes, sections."""
        return {**self.queue.snapshot(), **self.board.snapshot(history)}

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**self.queue.state_dict(), **self.board.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore settings, queue and history; invalid settings or changes are rejected at the next sync.

        Raises:
            KeyError: ``state_dict`` lacks ``settings``, ``pending`` or ``history``.
        """
        missing = {"settings", "pending", "history"} - set(state_dict)
        if missing:
            raise KeyError(f"`state_dict` lacks {sorted(missing)}; it has {sorted(state_dict)}")
        self.queue.load_state_dict(state_dict)
        self.board.load_state_dict(state_dict)

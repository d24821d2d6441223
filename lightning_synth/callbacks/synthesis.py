"""`SynthesisCallback`: the Lightning shell of a :class:`~lightning_synth.engine.SynthesisEngine`.

At each train epoch start it hands the engine the latest profile of its analyzer (explicit reference), the
epoch, the device and the model, and a communication layer over ``trainer.strategy``; it logs what the engine
reports. Its sampling callback (explicit reference) passes each epoch's per-sample losses to
:meth:`SynthesisEngine.observe`. It serves the control API on global rank 0 and stops it on every exit path
(teardown, ``on_exception``). Added for you by :class:`~lightning_synth.SyntheticDataModule` or returned by
:func:`lightning_synth.attach`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_synth.callbacks.adaptive_sampling import AdaptiveSampling
from lightning_synth.callbacks.failure_mode import FailureModeCallback
from lightning_synth.engine import EpochContext, StrategyComm, SynthesisEngine
from lightning_synth.logging import image_grid, log_images

__all__ = ["SynthesisCallback"]


def _control_server(controller: Any, host: str, port: int, token: str | None) -> Any:
    """The control API server (imported on first use: training without the API does not load FastAPI)."""
    from lightning_synth.control import ControlServer

    return ControlServer(controller, host=host, port=port, token=token)


class SynthesisCallback(Callback):
    """Drives a :class:`SynthesisEngine` once per train epoch.

    Args:
        engine: the engine to drive.
        analyzer: the callback whose ``profile`` the generators aim at (``None``: an empty profile).
        sampling: the callback that measures per-sample losses; they reach ``engine.observe``.
        log_images: log grids of each refresh's synthetic samples.
        serve_api: serve the HTTP control API on global rank 0 while training.
        api_host: interface of the control API.
        api_port: port of the control API (0 picks a free one).
        api_token: bearer token of the control API (generated and printed when ``None``).

    Raises:
        TypeError: if ``engine``, ``analyzer`` or ``sampling`` has the wrong type.
    """

    def __init__(
        self,
        engine: SynthesisEngine,
        analyzer: FailureModeCallback | None = None,
        sampling: AdaptiveSampling | None = None,
        log_images: bool = True,
        serve_api: bool = False,
        api_host: str = "127.0.0.1",
        api_port: int = 0,
        api_token: str | None = None,
    ) -> None:
        if not isinstance(engine, SynthesisEngine):
            raise TypeError(f"`engine` must be a SynthesisEngine, got {type(engine).__name__}")
        if analyzer is not None and not isinstance(analyzer, FailureModeCallback):
            raise TypeError(f"`analyzer` must be a FailureModeCallback or None, got {type(analyzer).__name__}")
        if sampling is not None and not isinstance(sampling, AdaptiveSampling):
            raise TypeError(f"`sampling` must be an AdaptiveSampling or None, got {type(sampling).__name__}")
        self.engine, self.analyzer, self.sampling = engine, analyzer, sampling
        if sampling is not None:
            sampling.add_listener(engine.observe)
        self.log_images = log_images
        self.serve_api, self.api_host, self.api_port, self.api_token = serve_api, api_host, api_port, api_token
        self.server: Any = None

    @property
    @override
    def state_key(self) -> str:
        return "SynthesisCallback"

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.serve_api and trainer.global_rank == 0 and self.server is None:
            server = _control_server(self.engine.controller, self.api_host, self.api_port, self.api_token)
            server.start()
            self.server = server
            rank_zero_info(f"lightning_synth control API at {server.url}")

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.engine.sampler is None:
            return  # the train loader was not built by a SyntheticDataModule
        context = EpochContext(epoch=trainer.current_epoch, step=trainer.global_step, device=pl_module.device,
                               task_model=pl_module)
        profile = self.analyzer.profile if self.analyzer is not None else None
        report = self.engine.epoch_start(profile, context, StrategyComm(trainer.strategy))
        for line in report.changes:
            rank_zero_info(f"lightning_synth settings: {line}")
        if report.generated:
            made = ", ".join(f"{name} {count}" for name, count in report.generated.items())
            rank_zero_info(f"lightning_synth epoch {trainer.current_epoch}: generated {made}; pool "
                           f"{len(self.engine.pool)}, synthetic weight {report.metrics['synth/weight']:.3f}")
        if self.log_images and report.samples:
            log_images(trainer, "synth/samples", {k: image_grid(v) for k, v in report.samples.items()})
        pl_module.log_dict(report.metrics, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=False)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(self.engine.summary())

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stop_server()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.stop_server()

    def stop_server(self) -> None:
        """Stop the control API if it runs (idempotent)."""
        server, self.server = self.server, None
        if server is not None:
            server.stop()

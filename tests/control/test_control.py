from __future__ import annotations

import atexit
import doctest
import json
import math
import threading
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_synth.control.controller as controller_module
import lightning_synth.control.errors as errors_module
import lightning_synth.control.queue as queue_module
import lightning_synth.control.settings as settings_module
import lightning_synth.control.status as status_module
from lightning_synth.control import (
    ChangeQueue,
    QueueFullError,
    SettingsError,
    SettingsPatch,
    StatusBoard,
    SynthesisController,
    SynthesisSettings,
)
from lightning_synth.datasets import load_digits_tensors
from lightning_synth.profile import Weakness, WeaknessProfile


def _profile(gap: float = 0.3) -> WeaknessProfile:
    return WeaknessProfile(
        clean_error=0.1, num_samples=100, epoch=2, frontier={"rotation": 2.5},
        weaknesses=[
            Weakness(kind="perturbation", name="rotation", severity=3, error_rate=0.4, gap=gap, support=100)
        ],
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"synthetic_budget": -1}, "synthetic_budget"),
        ({"synthetic_budget": 10**9}, "synthetic_budget"),
        ({"refresh_every_n_epochs": 0}, "refresh_every_n_epochs"),
        ({"synthetic_weight": 10.5}, "synthetic_weight"),
        ({"generator_mix": {"gan": -0.1}}, "generator_mix"),
        ({"generator_mix": {"gan": 0.0}}, "positive share"),
        ({"generator_mix": {"gan": math.inf}}, "generator_mix"),
        ({"generator_mix": {"gan": 2e6}}, "generator_mix"),
        ({"generator_mix": {"": 1.0}}, "generator_mix"),
        ({"sampler_temperature": 0.0}, "sampler_temperature"),
        ({"sampler_temperature": math.nan}, "sampler_temperature"),
        ({"sampler_uniform_mix": 1.01}, "sampler_uniform_mix"),
        ({"pinned_profile": {"frontier": {"blur": math.inf}}}, "must be JSON data"),
        ({"pinned_profile": {"pinned": 0}}, "`pinned`: Input should be a valid boolean"),
        ({"paused": 1}, "paused"),
        ({"synthetic_budget": 3.0}, "synthetic_budget"),
        ({"budget": 5}, "budget"),
    ],
)
def test_bad_settings_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SynthesisSettings(**kwargs)


def test_bad_controller_arguments_raise() -> None:
    with pytest.raises(TypeError, match="`settings` must be a SynthesisSettings"):
        SynthesisController(settings={"synthetic_budget": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_history` must be >= 1, got 0"):
        SynthesisController(max_history=0)
    with pytest.raises(TypeError, match="`max_pending` must be an int, got float"):
        SynthesisController(max_pending=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_pending_bytes` must be >= 1024, got 10"):
        SynthesisController(max_pending_bytes=10)
    with pytest.raises(ValueError, match="`known_generators` must be non-empty names"):
        SynthesisController(known_generators="gan")
    with pytest.raises(ValueError, match="`known_generators` must be non-empty names"):
        SynthesisController(known_generators=["gan", ""])
    with pytest.raises(ValueError, match=r"`generator_mix` names unknown generators \['vae'\]"):
        SynthesisController(SynthesisSettings(generator_mix={"vae": 1.0}), known_generators=["gan"])
    with pytest.raises(TypeError, match="`patch` must be a SettingsPatch or a mapping"):
        SynthesisController().apply_patch(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`pool` must be a mapping"):
        SynthesisController().publish(pool=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`sampler.bad` must be JSON-serialisable, got object"):
        SynthesisController().publish(sampler={"bad": object()})
    with pytest.raises(KeyError, match="sections are"):
        SynthesisController().section("nope")


@pytest.mark.parametrize(
    "module", [controller_module, errors_module, queue_module, settings_module, status_module]
)
def test_docstring_examples(module: Any) -> None:
    assert doctest.testmod(module, raise_on_error=True).failed == 0


def test_settings_validate_on_assignment_and_mark_pinned_profiles() -> None:
    settings = SynthesisSettings()
    with pytest.raises(ValueError, match="synthetic_weight"):
        settings.synthetic_weight = -0.5
    settings.pinned_profile = _profile()
    assert settings.pinned_profile is not None and settings.pinned_profile.pinned
    assert SynthesisSettings.model_validate_json(settings.model_dump_json()) == settings


def test_settings_helpers() -> None:
    settings = SynthesisSettings(synthetic_budget=10)
    assert settings.generator_budgets(["a", "b", "c"]) == {"a": 4, "b": 3, "c": 3}
    assert settings.generator_budgets(["a", "b"], automatic={"a": 0.9, "b": 0.1}) == {"a": 9, "b": 1}
    assert settings.generator_budgets([]) == {}
    assert settings.generator_budgets(["a", "b"], automatic={"a": math.nan, "b": -1.0}) == {"a": 5, "b": 5}
    pinned = SynthesisSettings(synthetic_budget=7, generator_mix={"b": 1.0})
    assert pinned.generator_budgets(["a", "b"], automatic={"a": 1.0}) == {"a": 0, "b": 7}
    measured = _profile(0.1)
    assert settings.effective_profile(measured) is measured
    chosen = SynthesisSettings(pinned_profile=_profile()).effective_profile(measured)
    assert chosen is not None and chosen.pinned and chosen.epoch == 2


def test_a_mix_that_names_none_of_the_generators_falls_back_to_the_automatic_split(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pinned = SynthesisSettings(synthetic_budget=7, generator_mix={"b": 1.0})
    with caplog.at_level("ERROR"):
        assert pinned.generator_budgets(["a", "c"], automatic={"a": 1.0, "c": 1.0}) == {"a": 4, "c": 3}
    assert "gives no share to any of ['a', 'c']" in caplog.text


def test_patch_allows_null_only_for_nullable_fields() -> None:
    assert SettingsPatch(synthetic_weight=None, pinned_profile=None).changes() == {
        "synthetic_weight": None, "pinned_profile": None,
    }
    with pytest.raises(ValueError, match="`paused` cannot be null"):
        SettingsPatch(paused=None)
    schema = SettingsPatch.model_json_schema()["properties"]
    assert "anyOf" not in schema["paused"] and schema["paused"]["type"] == "boolean"
    assert {"type": "null"} in schema["synthetic_weight"]["anyOf"]


def test_update_is_validated_at_once_and_applied_at_sync() -> None:
    controller = SynthesisController(known_generators=["augment", "gan"])
    with pytest.raises(SettingsError, match=r"`synthetic_budget`: Input should be greater than or equal"):
        controller.update(synthetic_budget=-5)
    with pytest.raises(ValueError, match=r"`synthetic_budgt` is not a setting; settings are \['synthetic_"):
        controller.update(synthetic_budgt=5)
    with pytest.raises(ValueError, match=r"unknown generators \['vae'\]; known: \['augment', 'gan'\]"):
        controller.update(generator_mix={"vae": 1.0})
    assert controller.pending == []

    controller.update(synthetic_budget=100, source="alice")
    preview = controller.apply_patch(SettingsPatch(paused=True, synthetic_budget=50), source="bob")
    assert (preview.synthetic_budget, preview.paused) == (50, True)
    assert controller.settings == SynthesisSettings() and controller.effective == preview
    assert [p.source for p in controller.pending] == ["alice", "bob"]

    messages = controller.sync()
    assert controller.settings == preview and controller.pending == []
    assert [(e.field, e.before, e.after, e.source) for e in controller.history] == [
        ("synthetic_budget", "2048", "100", "alice"),
        ("synthetic_budget", "100", "50", "bob"),
        ("paused", "false", "true", "bob"),
    ]
    assert messages[0].startswith("synthetic_budget 2048 -> 100 (by alice, queued ")
    assert controller.sync() == []  # nothing queued, nothing changes


def test_queued_change_rejected_when_generators_change_before_sync() -> None:
    controller = SynthesisController()
    controller.update(generator_mix={"vae": 1.0})
    controller.known_generators = ["gan"]
    controller.update(synthetic_budget=1)  # still accepted: the stale patch is skipped in the preview
    messages = controller.sync(epoch=2, step=7)
    assert messages[0].startswith("epoch 2 step 7: rejected change from python")
    assert "unknown generators ['vae']" in messages[0]
    assert controller.settings.generator_mix == {} and controller.settings.synthetic_budget == 1


class _FakeComm:
    """Stands in for a comm layer: every rank gets what rank 0 broadcast (ranks run in turn here)."""

    def __init__(self, channel: dict[str, Any], rank: int) -> None:
        self.channel, self.global_rank = channel, rank

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.global_rank == src:
            self.channel["obj"] = json.loads(json.dumps(obj))  # a copy, as pickling across processes makes
        return self.channel["obj"]


def test_sync_makes_ranks_identical_and_ignores_other_ranks_queues() -> None:
    channel: dict[str, Any] = {}
    rank0, rank1 = SynthesisController(), SynthesisController()
    rank0.update(synthetic_budget=64, pinned_profile=_profile(), source="http 127.0.0.1")
    rank1.update(synthetic_budget=999, paused=True)  # e.g. a local change on rank 1: must not win
    messages0 = rank0.sync(_FakeComm(channel, 0), epoch=3, step=30)
    messages1 = rank1.sync(_FakeComm(channel, 1), epoch=3, step=30)
    assert messages0 == messages1 and len(messages0) == 2
    assert messages0[0].startswith("epoch 3 step 30: synthetic_budget 2048 -> 64 (by http 127.0.0.1")
    assert rank0.settings == rank1.settings and rank1.settings.synthetic_budget == 64
    assert not rank1.settings.paused and rank1.pending == []
    assert rank0.history == rank1.history
    assert rank0.state_dict() == rank1.state_dict()


def test_sync_needs_every_rank() -> None:
    with pytest.raises(RuntimeError, match="call `sync\\(\\)` on every rank"):
        SynthesisController().sync(_FakeComm({"obj": None}, rank=1))


def test_status_board_is_json_ready() -> None:
    controller = SynthesisController()
    controller.publish(
        profile=_profile(), pool={"size": torch.tensor(12), "mass": torch.tensor([0.5, math.nan])}, epoch=4
    )
    controller.publish(sampler={"temperature": 1.0})
    pool = controller.section("pool")
    assert pool is not None and pool["epoch"] == 4 and pool["data"] == {"size": 12, "mass": [0.5, None]}
    status = controller.status()
    assert status["sections"]["profile"]["data"]["weaknesses"][0]["name"] == "rotation"
    assert status["sections"]["sampler"]["epoch"] is None and status["sections"]["weighting"] is None
    assert set(status) == {"settings", "effective", "pending", "history", "sections"}
    json.dumps(status, allow_nan=False)


def test_state_dict_round_trip() -> None:
    controller = SynthesisController()
    controller.update(synthetic_weight=0.25, pinned_profile=_profile())
    controller.sync()
    controller.update(paused=True)
    restored = SynthesisController()
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.settings == controller.settings and restored.history == controller.history
    assert restored.pending == controller.pending and restored.effective.paused
    with pytest.raises(KeyError, match=r"lacks \['history', 'pending'\]"):
        restored.load_state_dict({"settings": {}})


def test_concurrent_updates_are_all_applied() -> None:
    controller = SynthesisController()

    def writer(k: int) -> None:
        for i in range(50):
            controller.update(synthetic_budget=k * 1000 + i, source=f"thread {k}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    applied = 0
    while any(t.is_alive() for t in threads):
        applied += len(controller.sync())
    for t in threads:
        t.join()
    applied += len(controller.sync())
    assert applied == 200
    assert str(controller.settings.synthetic_budget) == controller.history[-1].after


def test_builds_from_a_cli_config() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SynthesisController, "control")
    config = parser.parse_object({"control": {
        "settings": {"synthetic_budget": 32, "generator_mix": {"gan": 2.0}, "pinned_profile": json.loads(
            _profile().to_json())},
        "known_generators": ["gan"],
    }})
    controller = parser.instantiate_classes(config).control
    assert controller.settings.synthetic_budget == 32 and controller.settings.pinned_profile.pinned
    with pytest.raises(jsonargparse.ArgumentError, match="synthetic_budget"):
        parser.parse_object({"control": {"settings": {"synthetic_budget": -1}}})


class _SyncAtEpochStart(L.Callback):
    """What the datamodule's wiring does: sync at train epoch start; here also a change mid-run."""

    def __init__(self, controller: SynthesisController) -> None:
        self.controller, self.budgets = controller, list[int]()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.controller.sync(trainer.strategy, epoch=trainer.current_epoch, step=trainer.global_step)
        self.budgets.append(self.controller.settings.synthetic_budget)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.controller.update(synthetic_budget=8, source="callback")


def test_changes_apply_at_the_next_epoch_in_a_real_fit(tiny_classifier, tmp_path: Any) -> None:
    images, labels = load_digits_tensors()
    loader = DataLoader(TensorDataset(images[:256], labels[:256]), batch_size=64)
    controller = SynthesisController()
    callback = _SyncAtEpochStart(controller)
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
    )
    trainer.fit(tiny_classifier(), loader)
    assert callback.budgets == [2048, 8, 8]
    event = controller.history[-1]
    assert (event.epoch, event.step, event.source) == (1, 4, "callback")


class _RankProbe(L.Callback):
    """Rank 0 and rank 1 queue different changes; each rank writes what it holds after sync."""

    def __init__(self, controller: SynthesisController, out: str) -> None:
        self.controller, self.out = controller, out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # In each spawned rank: destroy the gloo group before the interpreter's teardown, which it can abort.
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            rank = trainer.global_rank
            self.controller.update(synthetic_budget=5 if rank == 0 else 99, source=f"rank {rank}")
        messages = self.controller.sync(trainer.strategy, epoch=trainer.current_epoch, step=trainer.global_step)
        path = f"{self.out}/rank{trainer.global_rank}_epoch{trainer.current_epoch}.json"
        with open(path, "w") as f:
            json.dump({"state": self.controller.state_dict(), "messages": messages}, f)


@pytest.mark.slow
@pytest.mark.ddp
def test_sync_under_real_ddp(tiny_classifier, tmp_path: Any) -> None:
    images, labels = load_digits_tensors()
    loader = DataLoader(TensorDataset(images[:128], labels[:128]), batch_size=32)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[_RankProbe(SynthesisController(), str(tmp_path))], enable_progress_bar=False,
        enable_model_summary=False, logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
    )
    trainer.fit(tiny_classifier(), loader)
    for epoch in (0, 1):
        rank0, rank1 = (json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1))
        assert rank0 == rank1
        assert rank0["state"]["settings"]["synthetic_budget"] == 5
    assert rank0["messages"] == [] and rank0["state"]["history"][0]["source"] == "rank 0"


def test_queue_is_bounded_in_count_and_bytes() -> None:
    queue = ChangeQueue(max_pending=3, max_pending_bytes=1024)
    queue.submit({"paused": True})
    big = _profile().model_copy(update={"weaknesses": [_profile().weaknesses[0]] * 10})
    with pytest.raises(QueueFullError, match=r"`max_pending_bytes`=1024; this change: \d+ bytes"):
        queue.submit({"pinned_profile": big})
    queue.submit({"synthetic_budget": 1})
    queue.submit({"synthetic_budget": 2})
    with pytest.raises(QueueFullError, match="3 changes"):
        queue.submit({"synthetic_budget": 3})
    view = queue.view()
    assert (view.count, view.max_count) == (3, 3) and view.bytes == sum(i.bytes for i in view.items) < 1024
    assert len(queue.sync()) == 3 and queue.view().count == 0  # room again after the epoch boundary


def test_status_board_keeps_the_last_history_entries() -> None:
    controller = SynthesisController(max_history=2)
    for budget in (1, 2, 3):
        controller.update(synthetic_budget=budget)
        controller.sync(epoch=budget)
    assert [e.after for e in controller.history] == ["2", "3"]
    board = StatusBoard()
    board.load_state_dict(controller.board.state_dict())
    assert board.history == controller.history and board.snapshot(history=1)["history"][0]["after"] == "3"

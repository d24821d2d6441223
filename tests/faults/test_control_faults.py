"""Fault probes of the control API (issue 12): each ends in a clear error or a run that finishes.

1. An accepted setting can always be applied; a change that cannot (e.g. from an old checkpoint) is dropped
   with a logged error, never fatal.
2. A failed server start names host:port and can be retried; the server stops at interpreter exit.
3. Half-open and slow connections cannot exhaust file descriptors.
6. The change queue is bounded in bytes, and responses stay small.
7. NaN / Infinity in a PATCH body is a 422 naming the field, not a 500.
11. ``X-Forwarded-For`` cannot forge the source in the change history; a generated token is printed, not logged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import lightning as L
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from lightning_synth.control import ControlServer, SettingsError, SynthesisController, SynthesisSettings
from lightning_synth.datasets import load_digits_tensors
from lightning_synth.profile import Weakness, WeaknessProfile

TOKEN = "fault-token"
OVERFLOWING_MIX = {"targeted": 1e308, "scenario": 1e308}  # each share finite, their sum is not


@pytest.fixture
def server() -> Iterator[ControlServer]:
    with ControlServer(SynthesisController(known_generators=["targeted", "scenario"]), token=TOKEN) as running:
        yield running


def _patch(server: ControlServer, content: str | bytes, **headers: str) -> httpx.Response:
    headers = {"Content-Type": "application/json", **server.headers, **headers}
    return httpx.patch(server.url + "/settings", content=content, headers=headers, timeout=30)


# -- 1. anything accepted can be applied ----------------------------------------------------------------
def test_a_mix_whose_split_overflows_is_refused_in_python_and_over_http(server: ControlServer) -> None:
    with pytest.raises(SettingsError, match="`generator_mix"):
        SynthesisController().update(generator_mix=OVERFLOWING_MIX)
    response = _patch(server, json.dumps({"generator_mix": OVERFLOWING_MIX}))
    assert response.status_code == 422 and "`generator_mix" in response.json()["message"]
    assert server.controller.pending == []


@settings(max_examples=200, deadline=None, database=None)
@given(
    budget=st.integers(0, 10_000_000),
    mix=st.dictionaries(st.sampled_from("abcde"), st.floats(min_value=0, allow_nan=False), min_size=1),
)
def test_every_accepted_mix_splits_the_budget_exactly(budget: int, mix: dict[str, float]) -> None:
    try:
        accepted = SynthesisSettings(synthetic_budget=budget, generator_mix=mix)
    except ValueError:
        return
    counts = accepted.generator_budgets(["a", "b", "c"], automatic={"a": 1.0})
    assert sum(counts.values()) == budget and min(counts.values()) >= 0


def _checkpoint_written_before_the_fix() -> dict[str, Any]:
    """What the controller saved when the overflowing mix had been queued (and, resumed, applied)."""
    return {
        "settings": {**SynthesisSettings().model_dump(mode="json"), "generator_mix": OVERFLOWING_MIX},
        "pending": [{"changes": {"generator_mix": OVERFLOWING_MIX, "synthetic_budget": 64},
                     "source": "http 127.0.0.1", "queued_at": "2026-01-01T00:00:00.000+00:00"}],
        "history": [],
    }


class _ApplyAtEpochStart(L.Callback):
    """What the synthesis loop does with the settings at each epoch start: sync, then split the budget."""

    def __init__(self, controller: SynthesisController) -> None:
        self.controller, self.splits = controller, list[dict[str, int]]()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.controller.sync(trainer.strategy, epoch=trainer.current_epoch, step=trainer.global_step)
        self.splits.append(self.controller.settings.generator_budgets(["targeted", "scenario"]))


def test_a_bad_change_in_a_checkpoint_is_dropped_with_an_error_and_the_run_finishes(
    tiny_classifier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    controller = SynthesisController(known_generators=["targeted", "scenario"])
    with caplog.at_level(logging.ERROR):
        controller.load_state_dict(_checkpoint_written_before_the_fix())
    images, labels = load_digits_tensors()
    callback = _ApplyAtEpochStart(controller)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
    )
    with caplog.at_level(logging.ERROR):
        trainer.fit(tiny_classifier(), DataLoader(TensorDataset(images[:128], labels[:128]), batch_size=64))
    assert trainer.current_epoch == 2
    assert callback.splits == [{"targeted": 1024, "scenario": 1024}] * 2  # the mix fell back to automatic
    rejected = [e for e in controller.history if e.status == "rejected"]
    assert {e.source for e in rejected} == {"checkpoint", "http 127.0.0.1"}
    assert "`generator_mix" in caplog.text and "rejected change from http 127.0.0.1" in caplog.text
    assert controller.settings.generator_mix == {}


# -- 2. the server: a clear failed start, a retry that works, a stop at exit ------------------------------
def test_a_failed_start_names_host_and_port_and_a_retry_serves(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    server = ControlServer(SynthesisController(), port=port, token=TOKEN)
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            server.start()
        assert not server.is_running
        blocker.close()
        server.start()  # not "already started": the failed start left nothing behind
        assert httpx.get(server.url + "/healthz", headers=server.headers).status_code == 200
    finally:
        blocker.close()
        server.stop()


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_the_server_stops_at_interpreter_exit_even_after_an_error() -> None:
    code = (
        "import atexit\n"
        "from lightning_synth.control import ControlServer, SynthesisController\n"
        "servers = []\n"
        "atexit.register(lambda: print('running at exit:', servers[0].is_running, flush=True))  # runs last\n"
        "servers.append(ControlServer(SynthesisController(), token='t').start())\n"
        "raise KeyboardInterrupt  # a fit that dies without teardown\n"
    )
    result = _run_python(code)
    assert "KeyboardInterrupt" in result.stderr
    assert "running at exit: False" in result.stdout, result.stdout + result.stderr


# -- 3. half-open and slow connections --------------------------------------------------------------------
def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts file descriptors through /proc")
def test_half_open_connections_do_not_exhaust_file_descriptors() -> None:
    server = ControlServer(SynthesisController(), token=TOKEN, max_connections=32, request_timeout=2.0).start()
    clients: list[socket.socket] = []
    try:
        before = _open_fds()
        for _ in range(300):  # headers never finished
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            clients.append(sock)
        time.sleep(1.0)
        server_side = _open_fds() - before - len(clients)
        assert server_side <= 32 + 8, f"the server holds {server_side} connections"
        assert httpx.get(server.url + "/healthz", headers=server.headers, timeout=10).status_code == 200
        time.sleep(2.5)  # request_timeout: every half-open connection is closed by the server
        for sock in clients[-32:]:
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        for sock in clients:
            sock.close()
        server.stop()


def test_a_body_that_trickles_in_is_cut_off() -> None:
    with ControlServer(SynthesisController(), token=TOKEN, request_timeout=1.0) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        head = f"PATCH /settings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        sock.sendall((head + "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode())
        sock.settimeout(10)
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, not by our 10 s timeout
        assert time.monotonic() - started < 5
        sock.close()


# -- 6. the change queue is bounded in bytes, responses are small -----------------------------------------
def _big_profile() -> str:
    weakness = Weakness(kind="class", name="3", error_rate=0.5, gap=0.4, support=5, target=3)
    profile = WeaknessProfile(weaknesses=[weakness] * 7000, epoch=1)
    body = json.dumps({"pinned_profile": json.loads(profile.to_json())})
    assert 0.8e6 < len(body) < 1 << 20
    return body


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_megabyte_patches_are_bounded_by_the_queue_and_responses_stay_small(server: ControlServer) -> None:
    body = _big_profile()
    rss = _rss_bytes()
    responses = [_patch(server, body) for _ in range(10)]
    codes = [r.status_code for r in responses]
    assert set(codes) == {202, 429} and codes.count(202) <= 4, codes
    assert max(len(r.content) for r in responses) < 4096
    status = httpx.get(server.url + "/status", headers=server.headers, timeout=30)
    assert status.status_code == 200 and len(status.content) < 2 * len(body)  # at most the effective profile
    assert status.json()["pending"]["bytes"] <= server.controller.queue.max_pending_bytes
    if rss:
        assert _rss_bytes() - rss < 400 * 2**20


# -- 7. NaN / Infinity ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('{"synthetic_weight": NaN}', "`synthetic_weight`"),
        ('{"sampler_temperature": -Infinity}', "`sampler_temperature`"),
        ('{"generator_mix": {"targeted": Infinity}}', "`generator_mix.targeted`"),
        ('{"pinned_profile": {"clean_error": NaN}}', "`pinned_profile`"),
        ('{"synthetic_budget": 1e400}', "`synthetic_budget`"),
    ],
)
def test_nan_and_infinity_get_a_422_naming_the_field(server: ControlServer, content: str, field: str) -> None:
    response = _patch(server, content)
    assert response.status_code == 422 and field in response.json()["message"]
    json.dumps(response.json(), allow_nan=False)  # the answer itself is valid JSON


# -- 11. a forged source, a logged token --------------------------------------------------------------------
def test_x_forwarded_for_does_not_forge_the_source(server: ControlServer) -> None:
    response = _patch(server, '{"synthetic_budget": 7}', **{"X-Forwarded-For": "203.0.113.9"})
    assert response.status_code == 202
    server.controller.sync()
    assert server.controller.history[-1].source == "http 127.0.0.1"


def test_a_generated_token_is_printed_once_and_never_logged(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG), ControlServer(SynthesisController()) as server:
        token = server.token
    printed = capfd.readouterr()
    assert (printed.out + printed.err).count(token) == 1
    assert token not in caplog.text and not any(token in r.getMessage() for r in caplog.records)

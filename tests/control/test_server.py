from __future__ import annotations

import doctest
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import lightning as L
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from torch.utils.data import DataLoader, TensorDataset

import lightning_synth.control.server as server_module
from lightning_synth.control import ControlServer, SynthesisController
from lightning_synth.datasets import load_digits_tensors
from lightning_synth.profile import Weakness, WeaknessProfile

TOKEN = "test-token-123"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"controller": object()}, TypeError, "`controller` must be a SynthesisController"),
        ({"host": ""}, ValueError, "`host` must be a non-empty string"),
        ({"port": -1}, ValueError, r"`port` must be an int in \[0, 65535\]"),
        ({"port": 70000}, ValueError, r"`port` must be an int in \[0, 65535\]"),
        ({"port": True}, TypeError, "`port` must be an int"),
        ({"max_connections": 1}, ValueError, "`max_connections` must be >= 2, got 1"),
        ({"request_timeout": 0}, ValueError, r"`request_timeout` must be in \(0, 3600\]"),
        ({"request_timeout": "5"}, TypeError, "`request_timeout` must be a number, got str"),
        ({"token": ""}, ValueError, "`token` must be None or non-empty printable ASCII"),
        ({"token": "two words"}, ValueError, "got a 9-character string"),
        ({"max_body_bytes": 10}, ValueError, "`max_body_bytes` must be >= 1024, got 10"),
        ({"log_level": "loud"}, ValueError, "`log_level` must be a uvicorn level"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"controller": SynthesisController(), **kwargs}
    with pytest.raises(error, match=match):
        ControlServer(**kwargs)


def test_docstring_examples() -> None:
    assert doctest.testmod(server_module, raise_on_error=True).failed == 0


@pytest.fixture(scope="module")
def server() -> Iterator[ControlServer]:
    with ControlServer(SynthesisController(known_generators=["augment", "gan"]), token=TOKEN) as running:
        yield running


@pytest.fixture
def client(server: ControlServer) -> Iterator[httpx.Client]:
    server.controller.sync()  # start each test from an empty queue
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=5.0) as http:
        yield http


def test_auth_is_required_except_for_the_schema(server: ControlServer) -> None:
    for path in ("/settings", "/profile", "/pool", "/status", "/healthz"):
        assert httpx.get(server.url + path).status_code == 401
        wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json() == {"detail": "Invalid bearer token"}
    basic = httpx.get(server.url + "/settings", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401 and basic.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.patch(server.url + "/settings", json={"paused": True}).status_code == 401
    assert server.controller.pending == []
    schema = httpx.get(server.url + "/openapi.json")
    assert schema.status_code == 200 and "/settings" in schema.json()["paths"]
    assert httpx.get(server.url + "/docs").status_code == 404


def test_patch_queues_and_sync_applies(server: ControlServer, client: httpx.Client) -> None:
    response = client.patch("/settings", json={"synthetic_budget": 256, "generator_mix": {"gan": 1.0}})
    assert response.status_code == 202
    receipt = response.json()
    assert receipt["accepted"] == {"synthetic_budget": "256", "generator_mix": '{"gan": 1.0}'}
    assert receipt["pending_count"] == 1 and receipt["pending_bytes"] == receipt["bytes"] > 0
    body = client.get("/settings").json()
    assert body["applied"]["synthetic_budget"] == 2048 and body["effective"]["synthetic_budget"] == 256
    assert body["pending"]["items"][0]["changes"] == {"synthetic_budget": "256", "generator_mix": '{"gan": 1.0}'}
    assert body["pending"]["items"][0]["source"] == "http 127.0.0.1"
    assert server.controller.settings.synthetic_budget == 2048

    messages = server.controller.sync()
    assert [m.split(" ")[0] for m in messages] == ["synthetic_budget", "generator_mix"]
    body = client.get("/settings").json()
    assert body["applied"]["synthetic_budget"] == 256 and body["pending"]["count"] == 0
    history = client.get("/status").json()["history"]
    assert history[-1]["field"] == "generator_mix" and history[-1]["source"] == "http 127.0.0.1"
    client.patch("/settings", json={"synthetic_budget": 2048, "generator_mix": {}})  # restore for other tests


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('{"synthetic_budget": -3}', "`synthetic_budget`"),
        ('{"synthetic_budget": 1.5}', "`synthetic_budget`"),
        ('{"paused": null}', "`paused` cannot be null"),
        ('{"sampler_uniform_mix": false}', "`sampler_uniform_mix`"),
        ('{"budget": 3}', "`budget` is not a setting"),
        ('{"generator_mix": {"vae": 1}}', "`generator_mix` names unknown generators ['vae']"),
        ('{"generator_mix": {"gan": 0}}', "`generator_mix`"),
        ('{"pinned_profile": {"weaknesses": [{"kind": "colour"}]}}', "`weaknesses.0.kind`"),
        ('{"synthetic_budget": ', "`body`"),
        ("[1, 2]", "`body`"),
    ],
)
def test_bad_payloads_name_the_field(client: httpx.Client, content: str, field: str) -> None:
    response = client.patch("/settings", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    body = response.json()
    assert field in body["message"] and isinstance(body["detail"], list)
    assert client.get("/settings").json()["pending"]["count"] == 0


def test_body_size_and_queue_are_bounded(client: httpx.Client, server: ControlServer) -> None:
    json_type = {"Content-Type": "application/json"}
    big = client.patch("/settings", content=b"{" + b" " * (2 << 20) + b"}", headers=json_type)
    assert big.status_code == 413
    chunked = client.patch("/settings", content=iter([b'{"paused": true}']), headers=json_type)
    assert chunked.status_code == 411
    server.controller.queue.max_pending = 2
    try:
        assert [client.patch("/settings", json={"paused": p}).status_code for p in (True, False, True)] == [
            202, 202, 429,
        ]
    finally:
        server.controller.queue.max_pending = 1000


def test_read_endpoints(server: ControlServer, client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/profile").json()["active"] == "none"
    measured = WeaknessProfile(
        clean_error=0.1, num_samples=50, epoch=1,
        weaknesses=[Weakness(kind="class", name="3", error_rate=0.5, gap=0.4, support=5, target=3)],
    )
    server.controller.publish(profile=measured, pool={"size": 128, "by_generator": {"gan": 128}}, epoch=1)
    profile = client.get("/profile").json()
    assert profile["active"] == "measured" and profile["measured"]["data"]["weaknesses"][0]["name"] == "3"
    pool = client.get("/pool").json()
    assert pool["epoch"] == 1 and pool["data"] == {"size": 128, "by_generator": {"gan": 128}}

    pinned = measured.model_copy(update={"epoch": -1}).model_dump(mode="json")
    assert client.patch("/settings", json={"pinned_profile": pinned}).status_code == 202
    server.controller.sync()
    profile = client.get("/profile").json()
    assert profile["active"] == "pinned" and profile["pinned"]["pinned"] is True
    status = client.get("/status").json()
    assert set(status) == {"settings", "effective", "pending", "history", "sections"}
    assert status["sections"]["pool"]["epoch"] == 1 and status["sections"]["weighting"] is None
    client.patch("/settings", json={"pinned_profile": None})


def test_generated_token_is_printed_and_port_is_freed(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG):
        running = ControlServer(SynthesisController()).start()
    try:
        printed = capsys.readouterr().err
        assert len(running.token) >= 32 and running.token in printed and running.url in printed
        assert running.token not in caplog.text
        assert running.port != 0 and running.is_running
        assert httpx.get(running.url + "/healthz", headers=running.headers).status_code == 200
        with pytest.raises(RuntimeError, match="already started"):
            running.start()
    finally:
        running.stop()
    assert not running.is_running
    running.stop()  # idempotent
    with socket.socket() as probe:  # the port can be bound again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", running.port))


@pytest.fixture(scope="module")
def api_schema(server: ControlServer) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(max_examples=15, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_fuzz_schema_finds_no_server_errors(case: Any, server: ControlServer) -> None:
    # All checks, but "valid by the schema => 2xx": a mix of all-zero shares or of unknown generators is
    # schema-valid JSON yet rightly refused (422).
    excluded = [schemathesis.checks.positive_data_acceptance]
    case.call_and_validate(headers=server.headers, excluded_checks=excluded)


class _SyncAtEpochStart(L.Callback):
    def __init__(self, controller: SynthesisController) -> None:
        self.controller, self.budgets = controller, list[int]()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.controller.sync(trainer.strategy, epoch=trainer.current_epoch, step=trainer.global_step)
        self.budgets.append(self.controller.settings.synthetic_budget)


def test_clients_hammering_the_api_do_not_disturb_training(tiny_classifier, tmp_path: Any) -> None:
    controller = SynthesisController()
    callback, stop, codes, accepted = _SyncAtEpochStart(controller), threading.Event(), list[int](), [0]
    first_accepted = threading.Event()  # fit starts once the client is in, so epoch 1 sees a change

    def hammer(url: str, headers: dict[str, str]) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=5.0) as http:
            budget = 0
            while not stop.is_set():
                budget += 1
                codes.append(http.patch("/settings", json={"synthetic_budget": budget}).status_code)
                accepted[0] = budget if codes[-1] == 202 else accepted[0]
                if accepted[0]:
                    first_accepted.set()
                codes.append(http.get("/status").status_code)
                codes.append(http.patch("/settings", json={"synthetic_budget": -1}).status_code)

    images, labels = load_digits_tensors()
    loader = DataLoader(TensorDataset(images[:512], labels[:512]), batch_size=32)
    trainer = L.Trainer(
        max_epochs=4, accelerator="cpu", devices=1, callbacks=[callback], enable_progress_bar=False,
        enable_model_summary=False, logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
    )
    with ControlServer(controller, token=TOKEN) as running:
        client_thread = threading.Thread(target=hammer, args=(running.url, running.headers))
        client_thread.start()
        try:
            assert first_accepted.wait(30)
            trainer.fit(tiny_classifier(), loader)
        finally:
            stop.set()
            client_thread.join()
    assert trainer.current_epoch == 4 and set(codes) <= {200, 202, 422} and codes.count(422) >= 1
    assert callback.budgets[1:] == sorted(callback.budgets[1:])  # applied in order, at epoch starts only
    controller.sync()
    assert controller.settings.synthetic_budget == accepted[0] > 0

"""`ControlServer`: a small token-protected HTTP API over a :class:`SynthesisController`, while training runs.

The API reads the controller's status board and queues validated settings changes; the training loop
applies them at the next epoch boundary (:meth:`SynthesisController.sync`). Handlers only touch the
controller's locked state, so a client can neither crash nor stall training. Serve it on global rank 0 only.

Endpoints (all but ``/openapi.json`` need ``Authorization: Bearer <token>``):
``GET /settings``, ``PATCH /settings`` (body: :class:`SettingsPatch`; 202, applied at the next sync),
``GET /profile``, ``GET /pool``, ``GET /status``, ``GET /healthz``.

Bounded whatever clients do: request bodies (``max_body_bytes``), the change queue (count and bytes; 429 when
full), responses (the queue is summarised, never echoed), open connections (``max_connections``) and the
time a client may take to send a request (``request_timeout``). The change history records the socket peer,
never a client-supplied header such as ``X-Forwarded-For``.
"""

from __future__ import annotations

import atexit
import json
import logging
import secrets
import socket
import sys
import threading
import time
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.middleware.base import RequestResponseEndpoint
from starlette.responses import Response

from lightning_synth._validation import check_int
from lightning_synth.control.connections import bounded_h11
from lightning_synth.control.controller import SynthesisController
from lightning_synth.control.errors import QueueFullError, ServerStartError, SettingsError, shorten
from lightning_synth.control.queue import QueueView, SettingsChange, describe
from lightning_synth.control.settings import SETTING_NAMES, SettingsPatch, SynthesisSettings
from lightning_synth.profile import WeaknessProfile

__all__ = ["ControlServer", "create_app"]

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_BEARER = HTTPBearer(auto_error=False, description="The token ControlServer was given or printed.")


class ErrorMessage(BaseModel):
    detail: str


class SettingsView(BaseModel):
    """Applied settings, a summary of the queued changes, and the settings they lead to at the next sync."""

    applied: SynthesisSettings
    effective: SynthesisSettings
    pending: QueueView


class Receipt(BaseModel):
    """A queued change: each value it sets (described briefly), its size, and how full the queue now is."""

    accepted: dict[str, str]
    bytes: int
    pending_count: int
    pending_bytes: int
    max_pending_bytes: int


class Section(BaseModel):
    """The last value a training component published (``data`` is ``None`` until it has)."""

    epoch: int | None = None
    updated_at: str | None = None
    data: dict[str, Any] | None = None


class ProfileView(BaseModel):
    """The measured profile (as published), the pinned one, and which of them generators use."""

    active: Literal["pinned", "measured", "none"]
    pinned: WeaknessProfile | None
    measured: Section


class StatusView(BaseModel):
    settings: SynthesisSettings
    effective: SynthesisSettings
    pending: QueueView
    history: list[SettingsChange]
    sections: dict[str, Section | None]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


def _field_message(errors: list[dict[str, Any]]) -> str:
    """One line naming each bad field (FastAPI's ``detail`` entries say it only in ``loc``)."""
    parts = []
    for e in errors:
        loc, text, kind = list(e.get("loc", ())), str(e.get("msg", "")), e.get("type")
        field = ".".join(str(p) for p in loc[1:] if loc[:1] == ["body"]) or "body"
        if kind == "json_invalid":
            text = f"`body`: invalid JSON at position {loc[-1]}"
        elif kind == "extra_forbidden":
            text = f"`{field}` is not a setting; settings are {list(SETTING_NAMES)}"
        elif not text.startswith("`"):
            text = f"`{field}`: {text}"
        parts.append(text)
    return "Invalid request: " + "; ".join(parts)


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """422 naming each field; the input is shown shortened (it may be NaN, or a 1 MB profile)."""
    detail = [
        {"loc": [str(p) if not isinstance(p, int) else p for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
         "type": str(e.get("type", "")), **({"input": shorten(e["input"])} if "input" in e else {})}
        for e in errors
    ]
    return JSONResponse(status_code=422, content={"detail": detail, "message": _field_message(detail)})


def _receipt(controller: SynthesisController, patch: SettingsPatch) -> Receipt:
    raw = patch.model_dump(mode="json", exclude_unset=True)
    queue = controller.queue.view()
    return Receipt(
        accepted={k: describe(v) for k, v in raw.items()}, bytes=len(json.dumps(raw, default=str)),
        pending_count=queue.count, pending_bytes=queue.bytes, max_pending_bytes=queue.max_bytes,
    )


def create_app(controller: SynthesisController, token: str, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI application (without a server): used by :class:`ControlServer`, handy in tests."""
    if not isinstance(token, str) or not token:
        raise ValueError("`token` must be a non-empty string")

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]) -> None:
        if credentials is None:
            raise HTTPException(401, "Missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "Invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="lightning_synth control", version="1", docs_url=None, redoc_url=None,
        dependencies=[Depends(require_token)],
        responses={401: {"model": ErrorMessage, "description": "Missing or invalid bearer token"}},
    )

    @app.middleware("http")
    async def guard(request: Request, call_next: RequestResponseEndpoint) -> Response:
        length = request.headers.get("content-length")
        if length is None and request.method in ("PATCH", "POST", "PUT"):  # chunked: size unknown up front
            return JSONResponse(status_code=411, content={"detail": "Content-Length is required"})
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return JSONResponse(status_code=413, content={"detail": f"Body over {max_body_bytes} bytes"})
        response = await call_next(request)
        if response.status_code == 405:  # Starlette lists only the first route's methods for a shared path
            allowed = sorted({m for r in app.routes if getattr(r, "path", None) == request.url.path
                              for m in getattr(r, "methods", ())})
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(list(exc.errors()))

    @app.get("/settings", response_model=SettingsView)
    def get_settings() -> SettingsView:
        snapshot = controller.queue.snapshot()  # one consistent view
        return SettingsView(applied=snapshot["settings"], effective=snapshot["effective"],
                            pending=snapshot["pending"])

    @app.patch(
        "/settings", response_model=Receipt, status_code=202,
        responses={
            400: {"model": ErrorMessage, "description": "Body cannot be read (e.g. not UTF-8)"},
            411: {"model": ErrorMessage, "description": "No Content-Length header"},
            413: {"model": ErrorMessage, "description": "Body too large"},
            429: {"model": ErrorMessage, "description": "The change queue is full until the next epoch boundary"},
        },
    )
    def patch_settings(patch: SettingsPatch, request: Request) -> Receipt | JSONResponse:
        peer = request.scope.get("client")  # the socket peer: proxy headers are off, and never trusted here
        source = f"http {peer[0]}" if peer else "http"
        try:
            controller.apply_patch(patch, source=source)
        except SettingsError as error:
            return _validation_response([{**e, "loc": ["body", *e["loc"]]} for e in error.errors])
        except QueueFullError as error:
            return JSONResponse(status_code=429, content={"detail": str(error)})
        return _receipt(controller, patch)

    @app.get("/profile", response_model=ProfileView)
    def get_profile() -> ProfileView:
        pinned = controller.settings.pinned_profile
        measured = Section(**(controller.section("profile") or {}))
        active: Literal["pinned", "measured", "none"] = "none"
        if pinned is not None or measured.data is not None:
            active = "pinned" if pinned is not None else "measured"
        return ProfileView(active=active, pinned=pinned, measured=measured)

    @app.get("/pool", response_model=Section)
    def get_pool() -> Section:
        return Section(**(controller.section("pool") or {}))

    @app.get("/status", response_model=StatusView)
    def get_status() -> dict[str, Any]:
        return controller.status()

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health()

    return app


class ControlServer:
    """Serve the control API with uvicorn in a daemon thread; it stops on :meth:`stop` and at interpreter exit.

    Args:
        controller: the :class:`SynthesisController` to expose.
        host: interface to bind; the default keeps the API on this machine.
        port: TCP port; ``0`` picks a free one (read :attr:`port` after :meth:`start`).
        token: bearer token clients must send; ``None`` generates one (``secrets.token_urlsafe``) and prints it
            once to stderr at :meth:`start` (never to log handlers, which may write files).
        max_body_bytes: larger request bodies are refused with 413.
        max_connections: open connections at most; past it the oldest idle one is closed.
        request_timeout: seconds a client has to send a whole request (headers and body).
        log_level: uvicorn's log level.

    Raises:
        TypeError: ``controller`` is not a :class:`SynthesisController`, or an int argument is not an int.
        ValueError: a bad ``host``, ``port``, ``token``, ``max_body_bytes``, ``max_connections``,
            ``request_timeout`` or ``log_level``.

    Example:
        >>> import httpx
        >>> server = ControlServer(SynthesisController(), token="s3cret").start()
        >>> httpx.get(server.url + "/healthz", headers=server.headers).json()
        {'status': 'ok'}
        >>> httpx.get(server.url + "/healthz").status_code
        401
        >>> server.stop()
    """

    def __init__(
        self,
        controller: SynthesisController,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_body_bytes: int = 1 << 20,
        max_connections: int = 64,
        request_timeout: float = 10.0,
        log_level: str = "warning",
    ) -> None:
        if not isinstance(controller, SynthesisController):
            raise TypeError(f"`controller` must be a SynthesisController, got {type(controller).__name__}")
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"`host` must be a non-empty string, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"`port` must be an int, got {type(port).__name__}: {port!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"`port` must be an int in [0, 65535] (0 = any free port), got {port!r}")
        if token is not None and not (
            isinstance(token, str) and token and token.isascii() and token.isprintable() and " " not in token
        ):
            shown = f"a {len(token)}-character string" if isinstance(token, str) else type(token).__name__
            # the value itself is not echoed: it is (meant to be) a secret
            raise ValueError(f"`token` must be None or non-empty printable ASCII without spaces, got {shown}")
        check_int("max_body_bytes", max_body_bytes, 1024)
        check_int("max_connections", max_connections, 2)
        if isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float)):
            raise TypeError(f"`request_timeout` must be a number, got {type(request_timeout).__name__}")
        if not 0 < request_timeout <= 3600:
            raise ValueError(f"`request_timeout` must be in (0, 3600] seconds, got {request_timeout!r}")
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"`log_level` must be a uvicorn level such as 'warning', got {log_level!r}")
        self.controller, self.host, self.log_level = controller, host, log_level
        self.max_connections, self.request_timeout = max_connections, float(request_timeout)
        self._generated = token is None
        self.token: str = token if token is not None else secrets.token_urlsafe(32)
        self.app = create_app(controller, self.token, max_body_bytes)
        self._requested_port = port
        self._bound_port = 0
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port once started (and after it stopped); the requested one before."""
        return self._bound_port or self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header a client needs."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> ControlServer:
        """Bind the port and serve in a daemon thread; returns ``self``.

        Raises:
            RuntimeError: already started.
            ServerStartError: the port cannot be bound (e.g. in use) or the server did not start in time. The
                server is then left stopped, and ``start`` may be called again.
        """
        if self._thread is not None:
            raise RuntimeError(f"ControlServer already started at {self.url}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except OSError as error:
            sock.close()
            raise ServerStartError(
                f"ControlServer cannot bind {self.host}:{self._requested_port}: {error.strerror or error}; "
                "pass another `api_port` (0 picks a free one)"
            ) from error
        self._socket, self._bound_port = sock, int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app, log_level=self.log_level, log_config=None, access_log=False, lifespan="off",
            loop="asyncio", timeout_graceful_shutdown=1, proxy_headers=False, server_header=False,
            http=bounded_h11(self.max_connections, self.request_timeout), timeout_keep_alive=5,
            h11_max_incomplete_event_size=16 * 1024,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="lightning-synth-control", daemon=True
        )
        self._thread.start()
        self._wait_started(timeout)
        atexit.register(self.stop)
        if self.host not in _LOOPBACK:
            log.warning("Control API bound to %s: reachable from the network; guard the token.", self.host)
        if self._generated:  # printed, not logged: log handlers may write it into files
            print(f"lightning_synth control API at {self.url}; token: {self.token}", file=sys.stderr, flush=True)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down and free the port; safe to call again, from any thread, and at exit."""
        with self._stop_lock:
            server, thread, sock = self._server, self._thread, self._socket
            self._server, self._thread, self._socket = None, None, None
        atexit.unregister(self.stop)
        if server is not None:
            server.should_exit = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if sock is not None:
            sock.close()

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._server is not None and not self._server.started:
            if self._thread is None or not self._thread.is_alive() or time.monotonic() > deadline:
                where = f"{self.host}:{self.port}"
                self.stop()
                raise ServerStartError(f"ControlServer did not start on {where} within {timeout} s")
            time.sleep(0.005)

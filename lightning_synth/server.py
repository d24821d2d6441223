"""`ControlServer`: a small token-protected HTTP API over a :class:`SynthesisController`, while training runs.

The API reads the controller's status board and queues validated settings changes; the training loop
applies them at the next epoch boundary (:meth:`SynthesisController.sync`). Handlers only touch the
controller's locked state, so a client can neither crash nor stall training. Serve it on global rank 0 only.

Endpoints (all but ``/openapi.json`` need ``Authorization: Bearer <token>``):
``GET /settings``, ``PATCH /settings`` (body: :class:`SettingsPatch`; 202, applied at the next sync),
``GET /profile``, ``GET /pool``, ``GET /status``, ``GET /healthz``.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.middleware.base import RequestResponseEndpoint
from starlette.responses import Response

from lightning_synth.control import (
    SETTING_NAMES,
    PendingPatch,
    QueueFullError,
    SettingsChange,
    SettingsError,
    SettingsPatch,
    SynthesisController,
    SynthesisSettings,
)
from lightning_synth.profile import WeaknessProfile

__all__ = ["ControlServer", "create_app"]

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_BEARER = HTTPBearer(auto_error=False, description="The token ControlServer was given or logged.")


class ErrorMessage(BaseModel):
    detail: str


class SettingsView(BaseModel):
    """Applied settings, the queued changes, and the settings they lead to at the next epoch boundary."""

    applied: SynthesisSettings
    effective: SynthesisSettings
    pending: list[PendingPatch]


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
    pending: list[PendingPatch]
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
            reason = (e.get("ctx") or {}).get("error", "")
            text = f"`body`: invalid JSON at position {loc[-1]}: {reason}"
        elif kind == "extra_forbidden":
            text = f"`{field}` is not a setting; settings are {list(SETTING_NAMES)}"
        elif not text.startswith("`"):
            text = f"`{field}`: {text}"
        parts.append(text)
    return "Invalid request: " + "; ".join(parts)


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    detail = jsonable_encoder(errors)
    return JSONResponse(status_code=422, content={"detail": detail, "message": _field_message(detail)})


def create_app(controller: SynthesisController, token: str, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI application (without a server): used by :class:`ControlServer`, handy in tests."""
    if not token:
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
        status = controller.status(history=0)  # one consistent snapshot
        return SettingsView(applied=status["settings"], effective=status["effective"], pending=status["pending"])

    @app.patch(
        "/settings", response_model=SettingsView, status_code=202,
        responses={
            400: {"model": ErrorMessage, "description": "Body cannot be read (e.g. not UTF-8)"},
            411: {"model": ErrorMessage, "description": "No Content-Length header"},
            413: {"model": ErrorMessage, "description": "Body too large"},
            429: {"model": ErrorMessage, "description": "Too many changes wait for the next epoch boundary"},
        },
    )
    def patch_settings(patch: SettingsPatch, request: Request) -> SettingsView | JSONResponse:
        client = f"http {request.client.host}" if request.client is not None else "http"
        try:
            controller.apply_patch(patch, source=client)
        except SettingsError as error:
            return _validation_response([{**e, "loc": ["body", *e["loc"]]} for e in error.errors])
        except QueueFullError as error:
            return JSONResponse(status_code=429, content={"detail": str(error)})
        return get_settings()

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
    """Serve the control API with uvicorn in a daemon thread.

    Args:
        controller: the :class:`SynthesisController` to expose.
        host: interface to bind; the default keeps the API on this machine.
        port: TCP port; ``0`` picks a free one (read :attr:`port` after :meth:`start`).
        token: bearer token clients must send; ``None`` generates one (``secrets.token_urlsafe``) and logs it
            at :meth:`start`.
        max_body_bytes: larger request bodies are refused with 413.
        log_level: uvicorn's log level.

    Raises:
        TypeError: ``controller`` is not a :class:`SynthesisController`.
        ValueError: a bad ``host``, ``port``, ``token`` or ``max_body_bytes``.

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
        log_level: str = "warning",
    ) -> None:
        if not isinstance(controller, SynthesisController):
            raise TypeError(f"`controller` must be a SynthesisController, got {type(controller).__name__}")
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"`host` must be a non-empty string, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"`port` must be an int in [0, 65535] (0 = any free port), got {port!r}")
        if token is not None and not (
            isinstance(token, str) and token and token.isascii() and token.isprintable() and " " not in token
        ):
            shown = f"a {len(token)}-character string" if isinstance(token, str) else type(token).__name__
            # the value itself is not echoed: it is (meant to be) a secret
            raise ValueError(f"`token` must be None or non-empty printable ASCII without spaces, got {shown}")
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
            raise ValueError(f"`max_body_bytes` must be an int >= 1024, got {max_body_bytes!r}")
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"`log_level` must be a uvicorn level such as 'warning', got {log_level!r}")
        self.controller, self.host, self.log_level = controller, host, log_level
        self._generated = token is None
        self.token: str = token if token is not None else secrets.token_urlsafe(32)
        self.app = create_app(controller, self.token, max_body_bytes)
        self._requested_port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._socket.getsockname()[1] if self._socket is not None else self._requested_port

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
        """Bind the port (errors surface here) and serve in a daemon thread; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError(f"ControlServer already started at {self.url}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        config = uvicorn.Config(
            self.app, log_level=self.log_level, log_config=None, access_log=False, lifespan="off",
            loop="asyncio", timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="lightning-synth-control", daemon=True
        )
        self._thread.start()
        self._wait_started(timeout)
        if self.host not in _LOOPBACK:
            log.warning("Control API bound to %s: reachable from the network; guard the token.", self.host)
        if self._generated:
            log.warning("Control API at %s; token: %s", self.url, self.token)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down and free the port (no-op when not running)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread, self._socket = None, None, None

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._server is not None and not self._server.started:
            if self._thread is None or not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ControlServer did not start on {self.host}:{self._requested_port}")
            time.sleep(0.005)

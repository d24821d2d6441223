"""Bounded connections for the control server: at most N open, and none held by a slow or silent client.

uvicorn's own guards do not cover a client that opens a connection and never finishes its headers:
``limit_concurrency`` answers 503 only once a request has been read, and ``timeout_keep_alive`` starts only
after a first response. :func:`bounded_h11` builds uvicorn's h11 protocol with two more rules, checked per
connection: a request must be read and answered within ``request_timeout`` seconds of the connection opening
(or of the previous response), and past ``max_connections`` the oldest idle connection is closed (or the
new one, when every open connection is busy). The server's file descriptors are then bounded whatever
clients do. This is the one place that subclasses a uvicorn class; ``tests/control`` pins its behaviour.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["bounded_h11"]


def bounded_h11(max_connections: int, request_timeout: float) -> type[asyncio.Protocol]:
    """An ``H11Protocol`` subclass for ``uvicorn.Config(http=...)`` with its own connection registry."""
    registry: dict[BoundedH11, None] = {}  # insertion-ordered: the oldest connection first

    class BoundedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _armed_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            registry[self] = None
            live = [c for c in registry if not c.transport.is_closing()]  # closed ones leave at the next tick
            if len(live) > max_connections:
                idle = next((c for c in live if c is not self and c._idle()), None)
                (idle or self).transport.close()
                if idle is None:
                    return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            registry.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _idle(self) -> bool:
            """No request in progress: headers not finished yet, or between requests."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._armed_cycle = self.cycle
            self._deadline = self.loop.call_later(request_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            # No new request since arming (headers never finished), or one still unanswered (a body that
            # trickles in): the client is too slow. Idle keep-alive connections are closed by uvicorn itself.
            cycle = self.cycle
            stalled = cycle is self._armed_cycle or (cycle is not None and not cycle.response_complete)
            if stalled and not self.transport.is_closing():
                self.transport.close()

    return BoundedH11

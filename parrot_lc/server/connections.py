"""How every HTTP server of parrot_lc (the manager's, an engine process's, the in-process one) treats its
connections. uvicorn times out idle keep-alive connections but has no timeout for a request's headers: a client
that connects and sends half of its headers (or nothing) would hold the connection, and its buffers, for ever;
a thousand such clients hold a thousand. Here such a connection is closed after `header_timeout` seconds."""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# uvicorn closes a connection that has been idle this long. Clients keep idle connections for reuse (httpx for
# 5 s, uvicorn's own default too): a server that closes first may close one just as a client sends a request on
# it, which then fails with a reset connection. Longer than clients keep them, the client always closes first.
KEEP_ALIVE_S = 75


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request headers are not complete `header_timeout`
    seconds after it opened, or (on a kept-alive connection) after the first byte of its next request. Idle time
    between requests is the keep-alive timeout's; a request whose headers came is served however long it takes."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        between_requests = self.conn.their_state is h11.IDLE
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are complete (or the connection failed)
            self._disarm()
        elif between_requests and self._header_timer is None:  # a kept-alive connection's next request began
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._disarm()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def uvicorn_options(header_timeout: float) -> dict[str, Any]:
    """The options of uvicorn.Config that every server of parrot_lc shares: keep-alive and header timeouts."""
    protocol = type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout})
    return {"http": protocol, "timeout_keep_alive": KEEP_ALIVE_S}

"""How every HTTP server of parrot_lc (the manager's, an engine process's, the in-process one) treats its
connections. uvicorn times out idle keep-alive connections but has no timeout for a request's headers: a client
that connects and sends half of its headers (or nothing) would hold the connection, and its buffers, for ever;
a thousand such clients hold a thousand. Here such a connection is closed after `header_timeout` seconds.

Each server serves on a socket bound here (`bound_socket`), which uvicorn is given; the command line's servers bind
theirs before the model loads (`reserved_socket`), so that an address in use is an error at once."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import h11
from pydantic_settings import BaseSettings
from uvicorn.protocols.http.h11_impl import H11Protocol

from parrot_lc.settings import SettingsError, setting_error

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


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), not listening yet, for uvicorn to serve on
    (`uvicorn.Server.run(sockets=[...])`), which makes it listen. Raises OSError when it cannot be bound."""
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on the connections of
    # sockets that say they are TCP. With it on, a response written in two parts waited for the client's delayed
    # ACK: 40 ms a request on loopback.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # As uvicorn and asyncio bind: a server that restarts takes its port back from the connections of its last
        # run that are still in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def reserved_socket(settings: type[BaseSettings], host: str, port: int) -> socket.socket:
    """The socket of a server of the command line (`parrot-lc serve`, `parrot-lc engine`; `settings`: the class of
    its --host and --port), bound before anything slow (the model's load): an address in use, or not this
    machine's, is a SettingsError at once, naming --port or --host, rather than uvicorn's error once the model has
    loaded. Bound, not listening: while the model loads, a connection is refused at once rather than held
    unanswered (a TCP health check would take a loading server for a ready one); `listen` starts it, just before
    serving."""
    try:
        return bound_socket(host, port)
    except OSError as exc:
        raise _address_error(settings, host, port, exc) from None


def listen(sock: socket.socket, settings: type[BaseSettings]) -> None:
    """Starts listening on a socket of `reserved_socket`. Binding lets two processes started at once on one port
    both bind it (SO_REUSEADDR), listening only the first: the second gets the same SettingsError here, after its
    model has loaded, not a traceback from uvicorn."""
    try:
        sock.listen()
    except OSError as exc:
        host, port = sock.getsockname()[:2]
        raise _address_error(settings, host, port, exc) from None


def _address_error(settings: type[BaseSettings], host: str, port: int, exc: OSError) -> SettingsError:
    # A port in use, or one below 1024 without the privilege, is the port's fault; anything else (an address not of
    # this machine, a name that does not resolve) the host's.
    name = "port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "host"
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return setting_error(settings, name, f"cannot listen on {address}: {exc.strerror or exc}")

"""In-process mode: a Parrot server (engines, manager, HTTP on a loopback port) inside this process, one per
model and shared by everything that asks for it, for notebooks and tests. Clients reach it over HTTP like
any other server, so the API is the same."""

from __future__ import annotations

import atexit
import threading

from parrot_lc.frontend.client import ParrotClient
from parrot_lc.server.local import LocalServer
from parrot_lc.settings import EngineSettings

_servers: dict[str, LocalServer] = {}
_lock = threading.Lock()


def local_server(model: str = "smollm2") -> LocalServer:
    """The in-process server of `model` (a name such as `smollm2` or `tiny`, a checkpoint directory or a
    .gguf file), started on first use; other settings come from PARROT_* environment variables."""
    with _lock:
        server = _servers.get(model)
        if server is None:
            server = LocalServer(EngineSettings(model=model)).start()
            _servers[model] = server
        return server


def connect(model: str = "smollm2", **client_options) -> ParrotClient:
    """A client of the in-process server of `model`."""
    return ParrotClient(local_server(model).base_url, **client_options)


@atexit.register
def _stop_all() -> None:
    with _lock:
        for server in _servers.values():
            server.stop()
        _servers.clear()

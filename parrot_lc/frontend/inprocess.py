"""In-process mode: a Parrot server (engines, manager, HTTP on a loopback port) inside this process, one per model
and shared by everything that asks for it (`connect`, and LangChain's classes given a model and no base URL), for
notebooks and tests. Clients reach it over HTTP like any other server, so the API is the same.

This is the frontend's one door to the server's code: it is imported, with torch, when the first server starts,
never when this module is.
"""

from __future__ import annotations

import atexit
import threading
from typing import TYPE_CHECKING, Any

from parrot_lc.frontend.client import ParrotClient

if TYPE_CHECKING:
    from parrot_lc.server.local import LocalServer

DEFAULT_MODEL = "smollm2"
"""The model an in-process server runs when none is named: SmolLM2-135M-Instruct, embedded in the package."""

_servers: dict[str, LocalServer] = {}
_lock = threading.Lock()


def local_server(model: str = DEFAULT_MODEL) -> LocalServer:
    """The in-process server of `model` (a name such as `smollm2` or `tiny`, a checkpoint directory or a
    .gguf file), started on first use on a free loopback port (whatever PARROT_HOST and PARROT_PORT say: they are
    `parrot-lc serve`'s, and this server serves this process); other settings come from PARROT_* environment
    variables. A variable that holds no usable value raises parrot_lc.settings.SettingsError naming it, as
    `parrot-lc serve` says it."""
    from parrot_lc.server.local import LocalServer
    from parrot_lc.settings import EngineSettings, ServerSettings, load_settings

    with _lock:
        server = _servers.get(model)
        if server is None:
            engine_settings, server_settings = load_settings((EngineSettings, ServerSettings),
                                                             {"model": model, "host": "127.0.0.1", "port": 0})
            server = LocalServer(engine_settings, server_settings).start()
            _servers[model] = server
        return server


def connect(model: str = DEFAULT_MODEL, **client_options: Any) -> ParrotClient:
    """A client of the in-process server of `model`; `client_options` as for ParrotClient."""
    return ParrotClient(local_server(model).base_url, **client_options)


@atexit.register
def _stop_all() -> None:
    with _lock:
        for server in _servers.values():
            server.stop()
        _servers.clear()

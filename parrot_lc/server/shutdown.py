"""Graceful shutdown of the Parrot server. On the first SIGTERM the manager takes no new work (503), the calls
it has get `timeout` seconds to finish (clients keep fetching their results meanwhile), the rest are cancelled,
their contexts and the warm prefixes are freed; then uvicorn stops as usual and the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn

from parrot_lc.server.local import log_serving
from parrot_lc.server.manager import ParrotManager

log = logging.getLogger("parrot_lc.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the manager's drain before uvicorn's own shutdown (which at once stops accepting
    connections: a client would see a refused connection instead of a 503). A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, manager: ParrotManager, timeout: float) -> None:
        super().__init__(config)
        self.manager = manager
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log_serving(self.manager, f"http://{f'[{host}]' if ':' in host else host}:{port}")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.started and self._drain is None and self._loop is not None:
            # A signal handler may run in the middle of the loop's own code: hand over the way threads do.
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            if self._drain is not None:  # a second signal while draining: stop now, open connections or not
                self.force_exit = True
            super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        deadline = time.monotonic() + self.timeout
        log.info("SIGTERM: taking no new work; running calls get %.1f s to finish", self.timeout)
        try:
            await self.manager.drain(self.timeout)
        finally:
            # What remains is HTTP: fetches and streams of finished calls, given what is left of the deadline.
            self.config.timeout_graceful_shutdown = max(1.0, deadline - time.monotonic())
            self.should_exit = True

"""Graceful shutdown of the Parrot server. On the first SIGTERM (or Ctrl-C) the manager takes no new work (503), the
calls it has get `timeout` seconds to finish (clients keep fetching their results meanwhile), the rest are
cancelled, their contexts and the warm prefixes are freed; then uvicorn stops as usual and the process exits 0.

A second signal while it drains stops at once, as uvicorn's second Ctrl-C does: the calls still running are
cancelled, every fetch and stream still open is answered with that failure (not cut off with a traceback), and the
process exits with 128 + the signal's number, the status a shell gives a process that a signal stopped (143 for
SIGTERM, 130 for Ctrl-C): the work was not finished, which a service manager or a script should see."""

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

# After a second signal: how long uvicorn waits for the answers to the fetches and streams of the cancelled calls to
# go out (they are ready at once; a client that does not read its stream is cut off then).
STOP_NOW_GRACE_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the manager's drain before uvicorn's own shutdown (which at once stops accepting
    connections: a client would see a refused connection instead of a 503). A second signal stops at once;
    `stopped_now_by` is that signal."""

    def __init__(self, config: uvicorn.Config, manager: ParrotManager, timeout: float) -> None:
        super().__init__(config)
        self.manager = manager
        self.timeout = timeout
        self.stopped_now_by: signal.Signals | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_signal: signal.Signals | None = None
        self._drain: asyncio.Task | None = None  # held: the loop keeps only a weak reference to a task

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log_serving(self.manager, f"http://{f'[{host}]' if ':' in host else host}:{port}")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.started or self._loop is None:  # still starting: uvicorn's own stop
            super().handle_exit(sig, frame)
            return
        # Once serving, no signal reaches uvicorn's handler: it would raise the signal again once stopped, and a
        # Ctrl-C raised again ends asyncio's run with a KeyboardInterrupt traceback. A signal handler may run in
        # the middle of the loop's own code: hand over the way threads do.
        if self._first_signal is None:
            self._first_signal = signal.Signals(sig)
            self._loop.call_soon_threadsafe(self._start_drain, self._first_signal)
        elif self.stopped_now_by is None:
            self.stopped_now_by = signal.Signals(sig)
            self._loop.call_soon_threadsafe(self._stop_now, self.stopped_now_by)
        # A third signal finds the server stopping already.

    def _start_drain(self, sig: signal.Signals) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: signal.Signals) -> None:
        deadline = time.monotonic() + self.timeout
        log.info("%s: taking no new work; running calls get %.1f s to finish (a second signal stops now)", sig.name,
                 self.timeout)
        try:
            await self.manager.drain(self.timeout)
        finally:
            if self.stopped_now_by is None:
                # What remains is HTTP: fetches and streams of finished calls, given what is left of the deadline.
                self.config.timeout_graceful_shutdown = max(1.0, deadline - time.monotonic())
            self.should_exit = True

    def _stop_now(self, sig: signal.Signals) -> None:
        cancelled = self.manager.stop_now()
        log.warning("second %s: stopping now, %d running call%s cancelled", sig.name, cancelled,
                    "s" * (cancelled != 1), extra={"calls_cancelled": cancelled})
        self.config.timeout_graceful_shutdown = STOP_NOW_GRACE_S
        # Not uvicorn's force_exit: that skips the app's shutdown, whose tasks asyncio then cancels with tracebacks.
        self.should_exit = True

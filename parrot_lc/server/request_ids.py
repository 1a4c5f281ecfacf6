"""Every HTTP request gets an id: the client's `X-Request-Id` if it sends a sane one, else a fresh one. The id
goes back in the `X-Request-Id` response header and is on every log record made while serving the request,
including one record per request (method, path, status, duration)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parrot_lc.logs import request_id

HEADER = "X-Request-Id"
QUIET_PATHS = {"/health", "/metrics"}  # polled by probes and scrapers: their access lines are DEBUG
# What a client's id may be: short and plain, so that it cannot forge log lines or bloat them.
SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
log = logging.getLogger("parrot_lc.access")


def id_header() -> dict[str, str]:
    """The response header of the request being served (for responses made outside the middleware)."""
    current = request_id.get()
    return {HEADER: current} if current else {}


class RequestIds:
    """ASGI middleware (plain ASGI, so that streamed responses and client disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get(HEADER, "")
        rid = sent if SANE_ID.fullmatch(sent) else uuid.uuid4().hex
        # Not reset when the request ends: the handler of unexpected errors runs outside this middleware and logs
        # with the id too. Each request is served in a task, so in a context, of its own.
        request_id.set(rid)
        status, started = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(HEADER, rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
            # Probes and engines' heartbeats (one a second each) only at DEBUG: they would drown the requests.
            quiet = scope["path"] in QUIET_PATHS or scope["path"].endswith("/heartbeat")
            level = logging.DEBUG if quiet else logging.INFO
            log.log(level, "%s %s %d %.1f ms", scope["method"], scope["path"], status, duration_ms,
                     extra={"request_id": rid, "method": scope["method"], "path": scope["path"], "status": status,
                            "duration_ms": duration_ms})

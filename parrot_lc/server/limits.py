"""A limit on request bodies, as ASGI middleware: a body over the limit gets 413 whether it declares its length
or comes in chunks (a `Content-Length` check alone lets chunked bodies through)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parrot_lc.server.responses import error_response


class BodyLimit:
    """Reads each HTTP request body (up to `max_bytes`) before the app sees it, and answers 413 past that."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            # The whole body once, then the client's own messages (a disconnect, for streaming responses).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body over {self.max_bytes} bytes", "PayloadTooLarge", "body")
        await response(scope, receive, send)

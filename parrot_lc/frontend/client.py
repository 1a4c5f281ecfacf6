"""Clients of a Parrot server: `ParrotClient` (sync, httpx.Client) and `AsyncParrotClient` (httpx.AsyncClient).

Both open sessions; everything else (variables, semantic function calls, graphs, fetches) goes through a
session. Server errors become the typed exceptions of `parrot_lc.frontend.errors`, with the server's message.
For in-process use (notebooks, tests), start `parrot_lc.server.local.LocalServer` and pass its `base_url`.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import httpx

from parrot_lc.frontend.errors import ParrotConnectionError, ParrotError, RequestTimeoutError, response_body
from parrot_lc.frontend.session import AsyncSession, Request, Session, Steps

DEFAULT_TIMEOUT = 30.0
T = TypeVar("T")


class _ClientBase:
    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _long_poll_timeout(self, fetch_timeout: float | None) -> httpx.Timeout:
        """The server holds a fetch open until the value exists, so the read may last the fetch's timeout."""
        read = None if fetch_timeout is None else fetch_timeout + self.timeout
        return httpx.Timeout(self.timeout, read=read)

    @staticmethod
    def _options(request: Request) -> dict[str, Any]:
        return {"json": request.json, "params": request.params, "headers": request.headers,
                "timeout": request.timeout if request.timeout is not None else httpx.USE_CLIENT_DEFAULT}

    def _transport_error(self, exc: httpx.TransportError) -> ParrotError:
        if isinstance(exc, httpx.TimeoutException):
            return RequestTimeoutError(f"no answer from {self.base_url} within the client's timeout ({exc})")
        return ParrotConnectionError(f"cannot reach the Parrot server at {self.base_url}: {exc}")


class ParrotClient(_ClientBase):
    """A synchronous client. `timeout` (seconds) bounds each request; fetches wait longer (their own
    timeout, or without limit). `api_key` is for servers started with one; `http_options` go to httpx.Client
    (e.g. `event_hooks`, `verify`, `transport`).

    >>> with ParrotClient("http://127.0.0.1:9000") as client, client.session():
    ...     summary = summarize(report="...")  # a @semantic_function
    ...     print(summary.get())
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 **http_options: Any) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout, **http_options)

    def session(self, session_id: str | None = None, session_token: str | None = None) -> Session:
        """A new session; use it in a `with` block (or call `open()` / `close()`). With `session_id` and
        `session_token`, a handle to a session that exists on the server (opened by another client)."""
        return Session(self, session_id, session_token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ParrotClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, request: Request) -> Any:
        try:
            response = self._http.request(request.method, request.path, **self._options(request))
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        return response_body(response)

    def _drive(self, steps: Steps[T]) -> T:
        """Runs request steps, one request at a time; a request's error is raised inside the steps."""
        try:
            batch = next(steps)
            while True:
                try:
                    bodies = [self._send(request) for request in batch]
                except ParrotError as exc:
                    batch = steps.throw(exc)
                else:
                    batch = steps.send(bodies)
        except StopIteration as stop:
            return stop.value


class AsyncParrotClient(_ClientBase):
    """An asyncio client with the API of ParrotClient: `async with client.session() as session:`, and
    `await variable.aget()`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 **http_options: Any) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=timeout,
                                       **http_options)

    def session(self, session_id: str | None = None, session_token: str | None = None) -> AsyncSession:
        """A new session; use it in an `async with` block (or `await open()` / `await aclose()`). With
        `session_id` and `session_token`, a handle to a session that exists on the server."""
        return AsyncSession(self, session_id, session_token)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncParrotClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _send(self, request: Request) -> Any:
        try:
            response = await self._http.request(request.method, request.path, **self._options(request))
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        return response_body(response)

    async def _drive(self, steps: Steps[T]) -> T:
        """Runs request steps, the requests of a batch concurrently."""
        try:
            batch = next(steps)
            while True:
                try:
                    bodies = await asyncio.gather(*(self._send(request) for request in batch))
                except ParrotError as exc:
                    batch = steps.throw(exc)
                else:
                    batch = steps.send(list(bodies))
        except StopIteration as stop:
            return stop.value

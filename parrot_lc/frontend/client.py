"""Clients of a Parrot server: `ParrotClient` (sync, httpx.Client) and `AsyncParrotClient` (httpx.AsyncClient).

Both open sessions (variables, semantic function calls, graphs, fetches go through a session), ask the
OpenAI-compatible API for completions and chat replies, whole or streamed, and the served model's tokenizer for token
ids (`tokenize`, `detokenize`). Every operation is written once, as request steps (`parrot_lc.frontend.api`); a
client only runs them, and each client's driver is the one place where it meets HTTP: server errors become the typed
exceptions of `parrot_lc.frontend.errors`, with the server's message, and so do failures of the connection. For a
server in this process, see `parrot_lc.frontend.inprocess.connect`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import httpx

from parrot_lc.frontend.api import ApiRequest, Steps
from parrot_lc.frontend.completions import (
    Completion,
    MessageDict,
    chat_piece_of,
    chat_reply_of,
    chat_request,
    completion_of,
    completion_request,
    reply_steps,
    model_card_steps,
    served_models_steps,
)
from parrot_lc.frontend.errors import (
    ParrotConnectionError,
    ParrotError,
    RateLimitError,
    RequestTimeoutError,
    response_body,
)
from parrot_lc.frontend.events import EventParser
from parrot_lc.frontend.session import AsyncSession, Session
from parrot_lc.frontend.tokens import detokenize_steps, tokenize_steps

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 2
T = TypeVar("T")
# httpx.Client options that configure its default transport: given to the retrying transport made in its place.
_TRANSPORT_OPTIONS = ("verify", "cert", "trust_env", "http1", "http2", "limits")


def server_root(base_url: str) -> str:
    """The server's root URL. A trailing `/v1` (the base URL that OpenAI clients are given) is dropped."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class _ClientBase:
    def __init__(self, base_url: str, timeout: float | None, max_retries: int) -> None:
        self.base_url = server_root(base_url)
        self.timeout = timeout
        self.max_retries = max_retries

    def _retry_delay(self, exc: RateLimitError, attempt: int) -> float:
        """Seconds before retry `attempt` (0, 1...) of a request the server's full queue refused; raises `exc` once
        the retries are spent. The server's Retry-After where it gives one (up to a minute, as the `openai`
        package takes it), else 0.5 s doubled each time, up to 8 s."""
        if attempt >= self.max_retries:
            raise exc
        if exc.retry_after is not None and 0 < exc.retry_after <= 60:
            return exc.retry_after
        return min(0.5 * 2**attempt, 8.0)

    def _http_options(self, api_key: str | None, max_retries: int, options: dict[str, Any],
                      transport: Callable[..., Any]) -> dict[str, Any]:
        """The options of the httpx client: the API key's header (a `headers` option may override it), and unless
        a transport is given, one that retries a connection that cannot be made (nothing was sent: safe for every
        request)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        headers.update(options.pop("headers", None) or {})
        if "transport" not in options:
            options["transport"] = transport(retries=max_retries,
                                             **{k: options[k] for k in _TRANSPORT_OPTIONS if k in options})
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeout, **options}

    def _long_poll_timeout(self, fetch_timeout: float | None) -> httpx.Timeout:
        """The server holds a fetch open until the value exists, so the read may last the fetch's timeout."""
        read = None if fetch_timeout is None or self.timeout is None else fetch_timeout + self.timeout
        return httpx.Timeout(self.timeout, read=read)

    @staticmethod
    def _options(request: ApiRequest) -> dict[str, Any]:
        return {"json": request.json, "params": request.params, "headers": request.headers,
                "timeout": request.timeout if request.timeout is not None else httpx.USE_CLIENT_DEFAULT}

    def _transport_error(self, exc: httpx.TransportError, streaming: bool = False) -> ParrotError:
        """`streaming`: the failure came after a response stream had begun."""
        if isinstance(exc, httpx.TimeoutException):
            return RequestTimeoutError(f"no answer from the Parrot server at {self.base_url} within the client's "
                                       f"timeout ({exc})")
        if streaming:
            return ParrotConnectionError(f"the response stream from the Parrot server at {self.base_url} broke off: "
                                         f"{exc}")
        return ParrotConnectionError(f"cannot reach the Parrot server at {self.base_url}: {exc}")


class ParrotClient(_ClientBase):
    """A synchronous client. `timeout` (seconds; None: no limit) bounds each request; fetches wait longer (their
    own timeout, or without limit). `max_retries`: times a connection that cannot be made is tried again, and a
    request that the server's full queue refused (429, after its Retry-After; then RateLimitError).
    `api_key` is for servers started with one; `http_options` go to httpx.Client (e.g. `headers`, `event_hooks`,
    `verify`, `transport`). A trailing `/v1` of `base_url` is dropped.

    >>> with ParrotClient("http://127.0.0.1:9000") as client:
    ...     print(client.complete("The capital of France is", max_tokens=8, temperature=0).text)
    ...     with client.session():
    ...         print(summarize(report="...").get())  # a @semantic_function
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, **http_options: Any) -> None:
        super().__init__(base_url, timeout, max_retries)
        self._http = httpx.Client(**self._http_options(api_key, max_retries, http_options, httpx.HTTPTransport))

    def sends_as(self, other: ParrotClient) -> bool:
        """Whether `other`'s requests reach the server as this client's do: the same server, headers (the API key's
        among them) and query parameters."""
        return (self.base_url == other.base_url and self._http.headers == other._http.headers
                and self._http.params == other._http.params)

    def session(self, session_id: str | None = None, session_token: str | None = None, *,
                idle_timeout: float | None = None) -> Session:
        """A new session; use it in a `with` block (or call `open()` / `close()`). With `session_id` and
        `session_token`, a handle to a session that exists on the server (opened by another client). With
        `idle_timeout` (seconds), a graph submitted in parts raises IdleTimeoutError once no room came for its next
        part for that long (none of the session's calls ended)."""
        return Session(self, session_id, session_token, idle_timeout=idle_timeout)

    def complete(self, prompt: str | list[str], *, model: str | None = None, **options: Any) -> Completion:
        """The completion of `prompt` (`/v1/completions`; a list of prompts: their choices in order, `n` each).
        `model`: the served model's name (None: whichever the server serves; another name gets NotFoundError);
        `options`: sampling fields of the request, as the OpenAI API names them (`max_tokens`, `temperature`,
        `top_p`, `seed`, `stop`...)."""
        return self._drive(reply_steps(completion_request(prompt, model, options), completion_of))

    def stream_complete(self, prompt: str, *, model: str | None = None, **options: Any) -> Iterator[Completion]:
        """`complete()`, streamed: its pieces as the server generates them (the last one with the usage)."""
        return map(completion_of, self._events(completion_request(prompt, model, options, stream=True)))

    def chat(self, messages: list[MessageDict], *, model: str | None = None, **options: Any) -> Completion:
        """The reply to `messages` (`/v1/chat/completions`, rendered with the model's chat template); `model` and
        `options` as for `complete()`."""
        return self._drive(reply_steps(chat_request(messages, model, options), chat_reply_of))

    def stream_chat(self, messages: list[MessageDict], *, model: str | None = None,
                    **options: Any) -> Iterator[Completion]:
        """`chat()`, streamed: its pieces as the server generates them (the last one with the usage)."""
        return map(chat_piece_of, self._events(chat_request(messages, model, options, stream=True)))

    def tokenize(self, prompt: str | None = None, *, messages: list[MessageDict] | None = None,
                 model: str | None = None, add_special_tokens: bool = True,
                 add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The token ids of `prompt`, or of `messages` rendered with the model's chat template (with `tools`,
        OpenAI's tool definitions, as a chat request's are; ending with the start of the assistant's turn unless
        `add_generation_prompt` is false), as the server's completions tokenize them: with the tokenizer's own
        special tokens (a BOS) unless `add_special_tokens` is false (`POST /tokenize`)."""
        return self._drive(tokenize_steps(prompt, messages, model, add_special_tokens, add_generation_prompt, tools))

    def detokenize(self, tokens: list[int], *, model: str | None = None) -> str:
        """The text of token ids, special tokens written out (`POST /detokenize`)."""
        return self._drive(detokenize_steps(tokens, model))

    def served_models(self) -> list[str]:
        """The names of the models the server serves, as its replies name them (`GET /v1/models`)."""
        return self._drive(served_models_steps())

    def model_card(self, name: str) -> dict[str, Any]:
        """The card of the served model `name` (`GET /v1/models/{name}`: a name that requests may give it); a
        model the server does not serve raises NotFoundError."""
        return self._drive(model_card_steps(name))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ParrotClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, request: ApiRequest) -> Any:
        for attempt in itertools.count():
            try:
                response = self._http.request(request.method, request.path, **self._options(request))
            except httpx.TransportError as exc:
                raise self._transport_error(exc) from exc
            try:
                return response_body(response)
            except RateLimitError as exc:
                time.sleep(self._retry_delay(exc, attempt))

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

    def _events(self, request: ApiRequest) -> Iterator[dict[str, Any]]:
        """The server-sent events of a streamed response (a full queue's refusal, before any event, is retried)."""
        started = False
        for attempt in itertools.count():
            try:
                with self._http.stream(request.method, request.path, **self._options(request)) as response:
                    if response.is_error:
                        response.read()
                        response_body(response)  # raises the typed error
                    started, parser = True, EventParser()
                    for line in response.iter_lines():
                        yield from parser.feed(line)
                        if parser.done:
                            break
                    parser.end()
                return
            except httpx.TransportError as exc:
                raise self._transport_error(exc, started) from exc
            except RateLimitError as exc:
                time.sleep(self._retry_delay(exc, attempt))


class AsyncParrotClient(_ClientBase):
    """An asyncio client with the API of ParrotClient: `async with client.session() as session:`,
    `await variable.aget()`, `await client.complete(...)`, `async for piece in client.stream_complete(...)`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, **http_options: Any) -> None:
        super().__init__(base_url, timeout, max_retries)
        self._http = httpx.AsyncClient(**self._http_options(api_key, max_retries, http_options,
                                                            httpx.AsyncHTTPTransport))

    def session(self, session_id: str | None = None, session_token: str | None = None, *,
                idle_timeout: float | None = None) -> AsyncSession:
        """A new session; use it in an `async with` block (or `await open()` / `await aclose()`). With
        `session_id` and `session_token`, a handle to a session that exists on the server; `idle_timeout` as for
        `ParrotClient.session`."""
        return AsyncSession(self, session_id, session_token, idle_timeout=idle_timeout)

    async def complete(self, prompt: str | list[str], *, model: str | None = None, **options: Any) -> Completion:
        """See `ParrotClient.complete`."""
        return await self._drive(reply_steps(completion_request(prompt, model, options), completion_of))

    def stream_complete(self, prompt: str, *, model: str | None = None, **options: Any) -> AsyncIterator[Completion]:
        """See `ParrotClient.stream_complete`."""
        return _read(completion_of, self._events(completion_request(prompt, model, options, stream=True)))

    async def chat(self, messages: list[MessageDict], *, model: str | None = None, **options: Any) -> Completion:
        """See `ParrotClient.chat`."""
        return await self._drive(reply_steps(chat_request(messages, model, options), chat_reply_of))

    def stream_chat(self, messages: list[MessageDict], *, model: str | None = None,
                    **options: Any) -> AsyncIterator[Completion]:
        """See `ParrotClient.stream_chat`."""
        return _read(chat_piece_of, self._events(chat_request(messages, model, options, stream=True)))

    async def tokenize(self, prompt: str | None = None, *, messages: list[MessageDict] | None = None,
                       model: str | None = None, add_special_tokens: bool = True,
                       add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """See `ParrotClient.tokenize`."""
        return await self._drive(tokenize_steps(prompt, messages, model, add_special_tokens, add_generation_prompt,
                                                tools))

    async def detokenize(self, tokens: list[int], *, model: str | None = None) -> str:
        """See `ParrotClient.detokenize`."""
        return await self._drive(detokenize_steps(tokens, model))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncParrotClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _send(self, request: ApiRequest) -> Any:
        for attempt in itertools.count():
            try:
                response = await self._http.request(request.method, request.path, **self._options(request))
            except httpx.TransportError as exc:
                raise self._transport_error(exc) from exc
            try:
                return response_body(response)
            except RateLimitError as exc:
                await asyncio.sleep(self._retry_delay(exc, attempt))

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

    async def _events(self, request: ApiRequest) -> AsyncIterator[dict[str, Any]]:
        """The server-sent events of a streamed response (a full queue's refusal, before any event, is retried)."""
        started = False
        for attempt in itertools.count():
            try:
                async with self._http.stream(request.method, request.path, **self._options(request)) as response:
                    if response.is_error:
                        await response.aread()
                        response_body(response)  # raises the typed error
                    started, parser = True, EventParser()
                    async for line in response.aiter_lines():
                        for event in parser.feed(line):
                            yield event
                        if parser.done:
                            break
                    parser.end()
                return
            except httpx.TransportError as exc:
                raise self._transport_error(exc, started) from exc
            except RateLimitError as exc:
                await asyncio.sleep(self._retry_delay(exc, attempt))


async def _read(read: Callable[[dict[str, Any]], Completion],
                events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[Completion]:
    async for event in events:
        yield read(event)

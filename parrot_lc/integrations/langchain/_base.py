"""What ParrotLLM and ChatParrot share: where the server is (a URL, or one started in this process), the
sampling fields, the HTTP clients (httpx, sync and async), server-sent events and errors.

Nothing here imports torch or the server: the in-process server is imported and started on the first request
of a model that has no `base_url`, never when a class is constructed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
from langchain_core.language_models import LangSmithParams
from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, Field, PrivateAttr, SecretStr

from parrot_lc.frontend.errors import (
    ParrotConnectionError,
    ParrotError,
    RequestTimeoutError,
    response_body,
)

__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_MODEL", "ParrotParams"]

DEFAULT_MODEL = "smollm2"
"""The model run in this process when neither `base_url` nor `model` is given."""

DEFAULT_MAX_TOKENS = 256
"""Tokens generated when `max_tokens` is not set (always sent explicitly, so that every path of a class
generates the same number of tokens whatever the server's own default)."""

REMOTE_MODEL_NAME = "parrot"
"""The model name reported for a server reached by `base_url` when `model` is not set."""


class ParrotParams(BaseModel):
    """The fields of ParrotLLM and ChatParrot (a mixin: listed before the LangChain base class)."""

    base_url: str | None = Field(default_factory=from_env("PARROT_BASE_URL", default=None))
    """Root URL of a running Parrot server (`parrot-lc serve`), e.g. `"http://127.0.0.1:9000"`; requests go
    to its OpenAI-compatible `/v1/...` endpoints and its Parrot API `/api/...`. A trailing `/v1` is dropped.
    Default: the `PARROT_BASE_URL` environment variable. If neither is set, `model` runs in this process."""

    api_key: SecretStr | None = Field(default_factory=secret_from_env("PARROT_API_KEY", default=None))
    """API key of a server started with `--api-key`, sent as `Authorization: Bearer <key>`. Default: the
    `PARROT_API_KEY` environment variable (which an in-process server also reads)."""

    model: str | None = None
    """Without `base_url`: the model to run in this process: `"smollm2"` (the default, SmolLM2-135M-Instruct),
    `"tiny"` (random weights, for tests), a Hugging Face checkpoint directory or a .gguf file. One in-process
    server per model is started on first use and shared by every instance (and by `parrot_lc.connect`); its
    other settings come from `PARROT_*` environment variables (e.g. `PARROT_DEVICE`). With `base_url`: the name
    of the model the server serves, as its `GET /v1/models` lists it (a Parrot server serves one model and
    answers 404 to another name); unset, requests name none and get the served one. A per-call `model=` keyword
    argument does the same for one call."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default 256)."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature; 0 is greedy decoding (deterministic). Default: the server's (1.0)."""

    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches `top_p`.
    Default: the server's (1.0)."""

    stop: list[str] | None = None
    """Stop sequences: generation ends before the first of them (it is not part of the text). A call's own
    `stop` sequences are used together with these."""

    seed: int | None = Field(default=None, ge=0)
    """Seed of the sampler, for reproducible sampling at a temperature above 0."""

    timeout: float | None = 120.0
    """Seconds to wait for the server on each request (None: no limit)."""

    max_retries: int = Field(default=2, ge=0)
    """Times a request is retried when the connection to the server cannot be made."""

    streaming: bool = False
    """Whether `invoke` / `generate` stream the response internally, so that callbacks get each token
    (`on_llm_new_token`). `stream` / `astream` always stream."""

    client_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further options of both httpx clients (`httpx.Client` and `httpx.AsyncClient`), e.g. `verify` or
    `headers`."""

    sync_client_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Options of the sync client only (over `client_kwargs`), e.g. `transport` or `event_hooks`."""

    async_client_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Options of the async clients only (over `client_kwargs`), e.g. `transport` or async `event_hooks`."""

    _http: httpx.Client | None = PrivateAttr(default=None)
    _http_url: str | None = PrivateAttr(default=None)
    _http_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # ---- where the server is -----------------------------------------------------------------------

    def _model_name(self, model: str | None = None) -> str:
        """The name of the model a call runs on (per-call override, field, or the default), for metadata."""
        return self._requested_model(model) or REMOTE_MODEL_NAME

    def _requested_model(self, model: str | None = None) -> str | None:
        """The model a call names in its request: per-call override, field, the in-process default; None for a
        server at `base_url` (which then answers with the model it serves)."""
        if isinstance(model, str) and model:
            return model
        if self.model:
            return self.model
        return None if self.base_url else DEFAULT_MODEL

    def _server_url(self, model: str | None = None) -> str:
        """The server's root URL: `base_url`, or the in-process server of the model (started if need be)."""
        if self.base_url:
            url = self.base_url.rstrip("/")
            return url[: -len("/v1")] if url.endswith("/v1") else url
        from parrot_lc.inprocess import local_server  # imports torch: only in in-process mode

        return local_server(self._model_name(model)).base_url

    async def _aserver_url(self, model: str | None = None) -> str:
        if self.base_url:
            return self._server_url(model)
        return await asyncio.to_thread(self._server_url, model)  # loading a model must not block the loop

    # ---- HTTP ---------------------------------------------------------------------------------------

    def _client_options(self, specific: dict[str, Any]) -> dict[str, Any]:
        options = {**self.client_kwargs, **specific}
        headers = dict(options.pop("headers", None) or {})
        if self.api_key is not None:
            headers.setdefault("Authorization", f"Bearer {self.api_key.get_secret_value()}")
        options.setdefault("timeout", self.timeout)
        return {"headers": headers, **options}

    def _client(self, url: str) -> httpx.Client:
        """The sync client (made on first use, kept for its connection pool; thread-safe)."""
        with self._http_lock:
            if self._http is None or self._http_url != url:
                options = self._client_options(self.sync_client_kwargs)
                options.setdefault("transport", httpx.HTTPTransport(retries=self.max_retries))
                self._http, self._http_url = httpx.Client(base_url=url, **options), url
            return self._http

    def _async_client(self, url: str) -> httpx.AsyncClient:
        """A new async client, to be used in `async with` (a pooled one would be tied to one event loop)."""
        options = self._client_options(self.async_client_kwargs)
        options.setdefault("transport", httpx.AsyncHTTPTransport(retries=self.max_retries))
        return httpx.AsyncClient(base_url=url, **options)

    def _request(self, url: str, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client(url).request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(url, exc) from exc
        return response_body(response)

    @staticmethod
    async def _arequest(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(str(client.base_url), exc) from exc
        return response_body(response)

    def _post(self, path: str, body: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        return self._request(self._server_url(model), "POST", path, json=body)

    async def _apost(self, path: str, body: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        async with self._async_client(await self._aserver_url(model)) as client:
            return await self._arequest(client, "POST", path, json=body)

    def _post_events(self, path: str, body: dict[str, Any], model: str | None = None) -> Iterator[dict[str, Any]]:
        """POSTs a streaming request and yields its server-sent events (parsed JSON) until `data: [DONE]`."""
        url = self._server_url(model)
        started = False
        try:
            with self._client(url).stream("POST", path, json=body) as response:
                if response.is_error:
                    response.read()
                    response_body(response)
                started = True
                yield from sse_events(response.iter_lines())
        except httpx.TransportError as exc:
            raise transport_error(url, exc, started) from exc

    async def _apost_events(
        self, path: str, body: dict[str, Any], model: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        url = await self._aserver_url(model)
        started = False
        try:
            async with self._async_client(url) as client, client.stream("POST", path, json=body) as response:
                if response.is_error:
                    await response.aread()
                    response_body(response)
                started = True
                async for event in asse_events(response.aiter_lines()):
                    yield event
        except httpx.TransportError as exc:
            raise transport_error(url, exc, started) from exc

    # ---- request bodies -----------------------------------------------------------------------------

    def _stops(self, stop: list[str] | None) -> list[str]:
        """The field's stop sequences and the call's, without repeats."""
        return list(dict.fromkeys([*(self.stop or []), *(stop or [])]))

    def _sampling(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The sampling settings of a call: per-call keyword arguments over the fields."""
        sampling: dict[str, Any] = {"max_tokens": kwargs.get("max_tokens") or self.max_tokens or DEFAULT_MAX_TOKENS}
        for name in ("temperature", "top_p", "seed"):
            value = kwargs.get(name, getattr(self, name))
            if value is not None:
                sampling[name] = value
        stops = self._stops(stop)
        if stops:
            sampling["stop"] = stops
        return sampling

    def _openai_body(self, stop: list[str] | None, kwargs: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        model = self._requested_model(kwargs.get("model"))
        body = {**({"model": model} if model else {}), **self._sampling(stop, kwargs)}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    # ---- LangChain hooks ----------------------------------------------------------------------------

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self._model_name(),
            "base_url": self.base_url,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)  # type: ignore[misc]
        params["ls_provider"] = "parrot"
        params["ls_model_name"] = self._model_name(kwargs.get("model"))
        max_tokens = kwargs.get("max_tokens") or self.max_tokens
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        stops = self._stops(stop)
        if stops:
            params["ls_stop"] = stops
        return params


# ---- helpers ------------------------------------------------------------------------------------------


def transport_error(url: str, exc: httpx.TransportError, streaming: bool = False) -> ParrotError:
    """The frontend's error for a failure of the connection (`streaming`: after a stream had begun)."""
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeoutError(f"no answer from the Parrot server at {url} within the timeout ({exc})")
    if streaming:
        return ParrotConnectionError(f"the response stream from the Parrot server at {url} broke off: {exc}")
    return ParrotConnectionError(f"cannot reach the Parrot server at {url}: {exc}")


_DONE: dict[str, Any] = {}


def _event(line: str) -> dict[str, Any] | None:
    """The JSON of one `data: {...}` line (None for other lines); `data: [DONE]` gives `_DONE`."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    return _DONE if data == "[DONE]" else json.loads(data)


def _unfinished() -> ParrotError:
    return ParrotConnectionError("the server's event stream ended before `data: [DONE]`")


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        event = _event(line)
        if event is _DONE:
            return
        if event is not None:
            yield event
    raise _unfinished()


async def asse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        event = _event(line)
        if event is _DONE:
            return
        if event is not None:
            yield event
    raise _unfinished()


def usage_of(body: dict[str, Any]) -> dict[str, int] | None:
    """The OpenAI `usage` object of a response or event, as plain ints."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    return {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage}


def new_variables_body(count: int) -> dict[str, Any]:
    """The body of `POST /api/sessions/{id}/variables:batchCreate` that makes `count` unset variables (the outputs
    of a graph's calls) in one request."""
    return {"variables": [{} for _ in range(count)]}

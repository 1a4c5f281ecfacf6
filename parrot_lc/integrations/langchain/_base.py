"""What ParrotLLM and ChatParrot share: their fields (where the server is, sampling, the clients' options), the
frontend clients their requests go through, token counting by the served model's tokenizer, and LangChain's hooks.

Nothing here imports torch or the server: a model that has no `base_url` gets the frontend's in-process server
of its model, started on its first request, never when a class is constructed.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar

from langchain_core.language_models import LangSmithParams
from langchain_core.utils import from_env, secret_from_env
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from parrot_lc.frontend import AsyncParrotClient, Completion, InvalidRequestError, ParrotClient
from parrot_lc.frontend.client import DEFAULT_MAX_RETRIES
from parrot_lc.frontend.function import SAMPLING_FIELDS
from parrot_lc.frontend.inprocess import DEFAULT_MODEL, local_server
from parrot_lc.integrations.langchain._trace import current_trace

__all__ = ["CALL_OPTIONS", "DEFAULT_MAX_TOKENS", "PARAMS_CONFIG", "ParrotParams", "StreamEnd"]

DEFAULT_MAX_TOKENS = 256
"""Tokens generated when `max_tokens` is not set (always sent explicitly, so that every path of a class
generates the same number of tokens whatever the server's own default)."""

REMOTE_MODEL_NAME = "parrot"
"""The model name reported for a server reached by `base_url` when `model` is not set."""

PARAMS_CONFIG = ConfigDict(extra="forbid")
"""A class's config: an argument it does not know is refused, naming it, rather than dropped."""

SAMPLING_OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
                    "min_p")
"""Sampling fields that a call's keyword argument of the same name overrides."""
CALL_OPTIONS = frozenset({"model", "max_tokens", "max_completion_tokens", "ignore_eos", *SAMPLING_OPTIONS})
"""The keyword arguments that a call of either class takes (`invoke(..., temperature=0)`, `bind(...)`)."""
GRAPH_BODY_FIELDS = frozenset(SAMPLING_FIELDS) - {"constraint"}
"""The fields of an OpenAI request body that a graph call's sampling carries with the same meaning (all of its
settings but the Parrot API's `constraint`): those of `extra_body` that a deferred or batched call can send."""
SET_BY_EACH_REQUEST = frozenset({"model", "prompt", "messages", "stream", "stream_options"})
"""Request fields that every request sets itself: `extra_body` cannot set them."""


def summed_usage(usages: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Token usages (OpenAI's `usage` objects, None where a reply has none) added key by key, nested details
    (`prompt_tokens_details`) too, as an `llm_output`'s `token_usage` over several requests."""
    total: dict[str, Any] = {}
    for usage in usages:
        for key, count in (usage or {}).items():
            total[key] = summed_usage([total.get(key), count]) if isinstance(count, dict) else total.get(key, 0) + count
    return total


@functools.cache
def _field_adapter(cls: type[BaseModel], name: str) -> TypeAdapter:
    """Validates a value as the field `name` of `cls` does (its type and bounds)."""
    field_info = cls.model_fields[name]
    if not field_info.metadata:  # Annotated takes at least one
        return TypeAdapter(field_info.annotation)
    return TypeAdapter(Annotated[field_info.annotation, *field_info.metadata])


class ParrotParams(BaseModel):
    """The fields of ParrotLLM and ChatParrot (a mixin: listed before the LangChain base class, whose config
    ignores unknown arguments: each class sets `model_config = PARAMS_CONFIG` to refuse them, naming them)."""

    base_url: str | None = Field(default_factory=from_env("PARROT_BASE_URL", default=None),
                                 validation_alias=AliasChoices("base_url", "openai_api_base"))
    """Root URL of a running Parrot server (`parrot-lc serve`), e.g. `"http://127.0.0.1:9000"`; requests go
    to its OpenAI-compatible `/v1/...` endpoints and its Parrot API `/api/...`. A trailing `/v1` is dropped.
    Default: the `PARROT_BASE_URL` environment variable. If neither is set, `model` runs in this process. Also
    set as `openai_api_base` (ChatOpenAI's other name)."""

    api_key: SecretStr | None = Field(default_factory=secret_from_env("PARROT_API_KEY", default=None),
                                      validation_alias=AliasChoices("api_key", "openai_api_key"))
    """API key of a server started with `--api-key`, sent as `Authorization: Bearer <key>`. Default: the
    `PARROT_API_KEY` environment variable (which an in-process server also reads), not ChatOpenAI's
    `OPENAI_API_KEY`: a key for OpenAI is not sent to another server unless it is given here. Also set as
    `openai_api_key` (ChatOpenAI's other name)."""

    model: str | None = Field(default=None, validation_alias=AliasChoices("model", "model_name"))
    """Without `base_url`: the model to run in this process: `"smollm2"` (the default, SmolLM2-135M-Instruct),
    `"tiny"` (random weights, for tests), a Hugging Face checkpoint directory or a .gguf file. One in-process
    server per model is started on first use and shared by every instance (and by `parrot_lc.connect`); its
    other settings come from `PARROT_*` environment variables (e.g. `PARROT_DEVICE`). With `base_url`: the name
    of the model the server serves, as its `GET /v1/models` lists it (a Parrot server serves one model and
    answers 404 to another name); unset, requests name none and get the served one. A per-call `model=` keyword
    argument does the same for one call. Also set as `model_name` (ChatOpenAI's name of the field)."""

    max_tokens: int | None = Field(default=None, ge=1,
                                   validation_alias=AliasChoices("max_tokens", "max_completion_tokens"))
    """Most tokens to generate (default 256); also set as `max_completion_tokens`, OpenAI's newer name."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature; 0 is greedy decoding (deterministic). Default: the server's (1.0)."""

    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches `top_p`.
    Default: the server's (1.0)."""

    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """Subtracted from the logit of each token that the output holds already (OpenAI's option): above 0, new
    tokens are likelier. Default: the server's (0)."""

    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """Times a token's count in the output so far, subtracted from its logit (OpenAI's option): above 0, repeats
    are less likely. Default: the server's (0)."""

    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    """vLLM's repetition penalty: a positive logit of a token of the prompt or the output is divided by it, a
    negative one multiplied; above 1, repeats are less likely. Default: the server's (1)."""

    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    """Sample only tokens at least `min_p` times as likely as the most likely one (vLLM's option). Default: the
    server's (0: no cut)."""

    n: int | None = Field(default=None, ge=1)
    """Replies to each prompt or chat (OpenAI's `n`; default 1): `generate` / `agenerate` give them all (a prompt's
    list of generations), `invoke` the first. The server fills the prompt once and forks every reply from it; with a
    `seed`, reply i samples with seed + i. A stream has one reply: `streaming=True` with `n` above 1 is refused, as
    LangChain's OpenAI classes refuse it, and so is a stream of a call of several. Inside `deferred`, a call of
    several replies runs at once, on real text (a graph call has one output)."""

    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Request fields sent with every request that no argument of the class names (the option of LangChain's OpenAI
    classes). ChatParrot's are keyword arguments of every call, which a call's own override: those a call takes
    (`response_format`, `tools`, `tool_choice`, `parallel_tool_calls`); another is refused, naming it. ParrotLLM's
    are fields of every completion request body, checked by the server as `extra_body`'s are (e.g. vLLM's
    `{"top_k": 20}`, `min_tokens`, `echo`). A field that has an argument of its own (`temperature`...), or that
    every request sets itself (`prompt`, `messages`, `stream`), is refused, naming it."""

    stop: list[str] | None = None
    """Stop sequences (or one, as a string): generation ends before the first of them (it is not part of the
    text). A call's own `stop` sequences are used together with these."""

    seed: int | None = Field(default=None, ge=0)
    """Seed of the sampler, for reproducible sampling at a temperature above 0."""

    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token until `max_tokens` (vLLM's sampling option of that name):
    every call then generates exactly `max_tokens` tokens, as benchmarks need."""

    timeout: float | None = Field(default=120.0, gt=0, allow_inf_nan=False,
                                  validation_alias=AliasChoices("timeout", "request_timeout"))
    """Seconds to wait for the server on each request (None: no limit); past it a request raises
    `parrot_lc.frontend.RequestTimeoutError`. A run that waits for many values, a batch run as one graph or a
    deferred run (whose first model's `timeout` counts), is not bounded as a whole, since its calls queue on the
    server and its last values come long after its first: it raises `IdleTimeoutError` once none of its values arrived
    for `timeout` seconds (no call of its graph ended), as a request's timeout fires on a server that stopped
    answering; so does one of more calls than a session may hold, while it waits for room for its next part. Both
    are `TimeoutError`s. A positive number of seconds. Also set as `request_timeout` (ChatOpenAI's other name)."""

    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0)
    """Times a request is retried when the connection to the server cannot be made, or the server's full queue
    refused it (429, after its Retry-After)."""

    streaming: bool = False
    """Whether `invoke` / `generate` stream the response internally, so that callbacks get each token
    (`on_llm_new_token`). `stream` / `astream` always stream."""

    client_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further options of both clients (`ParrotClient` and `AsyncParrotClient`, which give them to `httpx.Client`
    and `httpx.AsyncClient`), e.g. `verify` or `headers`."""

    sync_client_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Options of the sync client only (over `client_kwargs`), e.g. `transport` or `event_hooks`."""

    async_client_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Options of the async clients only (over `client_kwargs`), e.g. `transport` or async `event_hooks`."""

    default_headers: dict[str, str] | None = None
    """HTTP headers sent with every request to the server (ChatOpenAI's option), those of deferred runs and
    batches too, e.g. a gateway's routing or tracing header. A `headers` option of the clients' kwargs overrides one
    of the same name."""

    default_query: dict[str, Any] | None = None
    """Query parameters added to the URL of every request to the server (ChatOpenAI's option), those of deferred
    runs and batches too, e.g. a gateway's `api-version`."""

    organization: str | None = Field(default=None,
                                     validation_alias=AliasChoices("organization", "openai_organization"))
    """Sent as the `OpenAI-Organization` header, as the `openai` package sends it (a Parrot server ignores it; a
    gateway before it may read it); `default_headers` may override it. Also set as `openai_organization`
    (ChatOpenAI's name of the field)."""

    extra_body: dict[str, Any] | None = None
    """Further fields of every completion or chat request body, merged over what the class sends (the `openai`
    package's `extra_body`), e.g. vLLM's sampling fields `{"top_k": 20, "repetition_penalty": 1.1}`; the server
    checks them (an unimplemented field, or a value out of range, is its 400 naming the field). A field that an
    argument, `model_kwargs` or the call's keyword arguments (or `stop`) also set is refused, naming it. A deferred
    call (a graph call) carries those of them that a graph call's sampling has with the same meaning (`top_k`,
    `min_p`, `repetition_penalty`, ..., see `GRAPH_BODY_FIELDS`); another raises InvalidRequestError naming it,
    never dropped (ParrotLLM's batch of several prompts goes as completion requests instead)."""

    http_client: Any = None
    """ChatOpenAI's own httpx.Client: not taken (any value but None is refused, naming the field). The frontend's
    clients make their httpx clients themselves, one per server (and per event loop, async), with the server's URL,
    the API key and a transport that retries a connection that cannot be made; give httpx's options in
    `client_kwargs` / `sync_client_kwargs` instead (`transport`, `verify`, `proxy`, `limits`, `event_hooks`...)."""

    http_async_client: Any = None
    """ChatOpenAI's own httpx.AsyncClient: not taken, as `http_client`; give httpx's options in
    `client_kwargs` / `async_client_kwargs` instead."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_sequences(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("http_client", "http_async_client")
    @classmethod
    def _own_http_clients(cls, value: Any, info: ValidationInfo) -> None:
        if value is not None:
            kwargs = "sync_client_kwargs" if info.field_name == "http_client" else "async_client_kwargs"
            raise ValueError(f"{info.field_name} is not taken: the frontend's clients make their own httpx clients "
                             f"(per server and event loop, with a retrying transport); give httpx's options in "
                             f"client_kwargs or {kwargs} instead (transport, verify, proxy, limits, event_hooks...)")
        return None

    @field_validator("model_kwargs")
    @classmethod
    def _no_arguments_in_model_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        explicit = sorted(set(value) & cls._argument_names())
        if explicit:
            raise ValueError(f"{explicit} should be given as arguments of their own, not in model_kwargs")
        reserved = sorted(set(value) & SET_BY_EACH_REQUEST)
        if reserved:
            raise ValueError(f"model_kwargs cannot set {reserved}: every request sets them")
        return value

    @classmethod
    def _argument_names(cls) -> set[str]:
        """The constructor's arguments: the fields' names and their other names."""
        names = set()
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            names |= {name, *(alias.choices if isinstance(alias, AliasChoices) else [alias or name])}
        return names

    @model_validator(mode="after")
    def _one_reply_when_streaming(self) -> ParrotParams:
        if self.streaming and (self.n or 1) > 1:
            raise ValueError("n must be 1 when streaming: a stream gives one reply")
        return self

    @model_validator(mode="after")
    def _extra_body_fields_once(self) -> ParrotParams:
        extra = set(self.extra_body or ())
        reserved = sorted(extra & SET_BY_EACH_REQUEST)
        if reserved:
            raise ValueError(f"extra_body cannot set {reserved}: every request sets them")
        twice = sorted(extra & self._fields_given())
        if twice:
            raise ValueError(f"extra_body: {twice} set by other arguments too (or model_kwargs): give each once")
        return self

    def _fields_given(self) -> set[str]:
        """The request fields that this model's arguments set (not left to their defaults), `model_kwargs`' among
        them."""
        return (self.model_fields_set & (self._call_options | {"stop"})) | set(self.model_kwargs)

    _call_options: ClassVar[frozenset[str]] = CALL_OPTIONS
    """The keyword arguments a call takes; others are refused (ValueError) before any request."""

    _request_fields: ClassVar[tuple[str, ...]] = ("n",)
    """The fields that a request sends as they are, unless the call's keyword arguments set them (each a call
    option too)."""

    _clients: dict[str, ParrotClient] = PrivateAttr(default_factory=dict)
    # Async clients by event loop (an httpx.AsyncClient's connections belong to the loop that made them), then URL.
    _async_clients: weakref.WeakKeyDictionary = PrivateAttr(default_factory=weakref.WeakKeyDictionary)
    _clients_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _served_model: str | None = PrivateAttr(default=None)  # the model a server at base_url serves, once asked
    _served_names: set[str] = PrivateAttr(default_factory=set)  # requested names the server at base_url answers to

    # ---- where the server is -----------------------------------------------------------------------

    def _model_name(self, model: str | None = None) -> str:
        """The name of the model a call runs on (per-call override, field, or the default), for metadata."""
        return self._requested_model(model) or REMOTE_MODEL_NAME

    def _reply_model_name(self, model: str | None = None) -> str:
        """The model name a reply reports (as the server's replies do): the requested model, else the one the
        server at `base_url` serves (asked once). For a deferred call's reply or a batch run as a graph, which no
        server reply names."""
        requested = self._requested_model(model)
        if requested:
            return requested
        if self._served_model is None:
            self._served_model = next(iter(self.parrot_client().served_models()), REMOTE_MODEL_NAME)
        return self._served_model

    def _check_served(self, model: str | None = None) -> None:
        """Refuses a batched or deferred call (a graph call, which runs on the served model whatever it names) for a
        model that the server at `base_url` does not serve, as the server refuses an eager call's request:
        NotFoundError naming `model` (the server is asked once a name)."""
        requested = self._requested_model(model)
        if not self.base_url or requested is None or requested in self._served_names:
            return
        self.parrot_client().model_card(requested)
        self._served_names.add(requested)

    def _requested_model(self, model: str | None = None) -> str | None:
        """The model a call names in its request: per-call override, field, the in-process default; None for a
        server at `base_url` (which then answers with the model it serves)."""
        if isinstance(model, str) and model:
            return model
        if self.model:
            return self.model
        return None if self.base_url else DEFAULT_MODEL

    def _server_url(self, model: str | None = None) -> str:
        """`base_url`, or the URL of the in-process server of the model (started if need be)."""
        return self.base_url or local_server(self._model_name(model)).base_url

    # ---- the frontend's clients ----------------------------------------------------------------------

    def parrot_client(self, model: str | None = None) -> ParrotClient:
        """The frontend client this model's sync requests go through, to the server of `model` (a per-call
        override, else the field's): made on first use and kept, for its connection pool; thread-safe. Also for
        Parrot's own API beside LangChain's, e.g. `with llm.parrot_client().session() as session: ...`."""
        url = self._server_url(model)
        with self._clients_lock:
            if url not in self._clients:
                self._clients[url] = ParrotClient(url, **self._client_options(self.sync_client_kwargs))
            return self._clients[url]

    async def _async_client(self, model: str | None = None) -> AsyncParrotClient:
        """The async client of this event loop to the server of `model`: made on first use and kept, for its
        connection pool (a client made per call costs a TLS context and a connection: at hundreds of concurrent
        streams, most of a first token's wait)."""
        url = self.base_url or await asyncio.to_thread(self._server_url, model)  # loading a model blocks
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            clients = self._async_clients.setdefault(loop, {})
            if url not in clients:
                clients[url] = AsyncParrotClient(url, **self._client_options(self.async_client_kwargs))
            return clients[url]

    def _client_options(self, specific: dict[str, Any]) -> dict[str, Any]:
        options = {"timeout": self.timeout, **self.client_kwargs, **specific}
        organization = {"OpenAI-Organization": self.organization} if self.organization else {}
        headers = {**organization, **(self.default_headers or {}), **(options.get("headers") or {})}
        params = {**(self.default_query or {}), **(options.get("params") or {})}  # httpx adds a request's own
        if headers:
            options["headers"] = headers
        if params:
            options["params"] = params
        api_key = self.api_key.get_secret_value() if self.api_key is not None else None
        return {"api_key": api_key, "max_retries": self.max_retries, **options}

    # ---- what a call asks for ------------------------------------------------------------------------

    def _stops(self, stop: list[str] | None) -> list[str]:
        """The field's stop sequences and the call's (a list, or one as a string), without repeats."""
        return list(dict.fromkeys([*(self.stop or []), *([stop] if isinstance(stop, str) else stop or [])]))

    def _sampling(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The sampling settings of a call: per-call keyword arguments over the fields."""
        unknown = sorted(set(kwargs) - self._call_options)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unsupported call options {unknown}; a call takes "
                             f"{sorted(self._call_options)}")
        max_tokens = self._max_tokens(kwargs)
        sampling: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens}
        for name in SAMPLING_OPTIONS:
            value = kwargs.get(name, getattr(self, name))
            if value is not None:
                sampling[name] = value
        if kwargs.get("ignore_eos", self.ignore_eos):
            sampling["ignore_eos"] = True
        stops = self._stops(stop)
        if stops:
            sampling["stop"] = stops
        return sampling

    def _max_tokens(self, kwargs: dict[str, Any]) -> int | None:
        """The call's `max_tokens` (or OpenAI's newer `max_completion_tokens`), else the field's."""
        for value in (kwargs.get("max_tokens"), kwargs.get("max_completion_tokens"), self.max_tokens):
            if value is not None:
                return value
        return None

    def _checked_option(self, name: str, value: Any) -> Any:
        """A call's option as the field of its name takes it (`max_tokens=3.0` is 3, as the constructor makes it: the
        server takes JSON's types strictly); one that the field would refuse raises InvalidRequestError naming it,
        so that eager, batched and deferred calls refuse the same values (a graph call's own bounds are wider)."""
        try:
            return _field_adapter(type(self), "max_tokens" if name == "max_completion_tokens" else name
                                  ).validate_python(value)
        except ValidationError as exc:
            raise InvalidRequestError(f"{type(self).__name__}: {name}={value!r}: {exc.errors()[0]['msg']}",
                                      field=name) from None

    def _call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's keyword arguments (its options checked and converted, `_checked_option`) over the fields that
        the request sends as they are (`_request_fields`)."""
        fields = {name: getattr(self, name) for name in self._request_fields if getattr(self, name) is not None}
        checked = ("max_tokens", "max_completion_tokens", *SAMPLING_OPTIONS, *self._request_fields)
        return {**fields, **{name: self._checked_option(name, value) if name in checked and value is not None else value
                             for name, value in kwargs.items()}}

    def _streamed_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A stream's keyword arguments, as `_call_kwargs`; a stream of several replies is refused."""
        kwargs = self._call_kwargs(kwargs)
        if (kwargs.get("n") or 1) > 1:
            raise ValueError(f"{type(self).__name__}: n must be 1 when streaming (got n={kwargs['n']}): a stream "
                             "gives one reply; `generate` gives several")
        return kwargs

    def _request_options(self, stop: list[str] | None, kwargs: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """The keyword arguments of a completion or chat request of the frontend: the model, sampling, the request's
        other `fields` (a chat's tools...), and the body fields of the arguments over them (`extra_body`'s, as the
        `openai` package merges them)."""
        options = {"model": self._requested_model(kwargs.get("model")), **self._sampling(stop, kwargs), **fields}
        return {**options, **self._body_fields(stop, kwargs)}

    def _body_fields(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The fields that the arguments add to every request body as they are: `extra_body`'s."""
        return self._extra_body(stop, kwargs)

    def _uncarried_fields(self, stop: list[str] | None, kwargs: dict[str, Any]) -> list[str]:
        """The body fields of the arguments (`_body_fields`) that a graph call's sampling does not carry."""
        return [name for name in self._body_fields(stop, kwargs) if name not in GRAPH_BODY_FIELDS]

    def _needs_a_request(self, trace: Any, kwargs: dict[str, Any]) -> bool:
        """Whether a call must run at once, as a request of its own, rather than be recorded in the deferred run
        of `trace`: it asks for what a graph call's output (one text) does not hold, log-probabilities or several
        replies (noted in the run's waits)."""
        if self._asks_for_logprobs(kwargs):
            trace.note(type(self).__name__, "calls with log-probabilities run at once, on real text")
            return True
        if (kwargs.get("n") or 1) > 1:
            trace.note(type(self).__name__, "calls of several replies (n) run at once, on real text")
            return True
        return False

    @staticmethod
    def _asks_for_logprobs(kwargs: dict[str, Any]) -> bool:
        """Whether a call asks for log-probabilities: a chat's `logprobs=True`, a completion's `logprobs=k` (0 too:
        the sampled token's alone)."""
        logprobs = kwargs.get("logprobs")
        return logprobs is not None and logprobs is not False

    def _graph_sampling(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The sampling of a graph call (deferred or batched): a call's, with the body fields of the arguments that a
        graph call carries; one that it cannot carry raises InvalidRequestError naming it, never dropped (the call
        would differ from the request that an eager call sends)."""
        sampling = self._sampling(stop, kwargs)
        uncarried = self._uncarried_fields(stop, kwargs)
        if uncarried:
            raise InvalidRequestError(f"{type(self).__name__}: the request field {uncarried[0]!r} cannot be sent with "
                                      f"a deferred or batched call (a graph call), which carries "
                                      f"{sorted(GRAPH_BODY_FIELDS)}", field=uncarried[0])
        for name, value in self._body_fields(stop, kwargs).items():
            if name == "stop" and isinstance(value, str):
                value = [value]
            sampling[name] = 0 if name == "top_k" and value == -1 else value  # vLLM's -1 is a graph call's 0: no cut
        return sampling

    def _extra_body(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`extra_body`'s fields for a call; one that the call sets too is refused, naming it."""
        extra = self.extra_body or {}
        twice = sorted(set(extra) & {*kwargs, *(["stop"] if stop else [])})
        if twice:
            raise ValueError(f"{type(self).__name__}: {twice} set both in extra_body and by the call")
        return extra

    # ---- tokens, and text of a deferred run -----------------------------------------------------------------

    def get_token_ids(self, text: str) -> list[int]:
        """The token ids of `text` by the served model's own tokenizer (the server's `POST /tokenize`, without
        special tokens): no other tokenizer is downloaded, and `get_num_tokens` counts these. Inside a deferred run,
        of the real text (waiting for the values in it)."""
        text = str(self._known(text, f"{type(self).__name__}.get_token_ids"))
        return self.parrot_client().tokenize(text, model=self._requested_model(), add_special_tokens=False)

    def _known(self, data: Any, step: str) -> Any:
        """`data` with real text, inside a deferred run (`step` names what waits for it); else as it is."""
        trace = current_trace()
        return trace.resolve(data, step) if trace is not None else data

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
        max_tokens = self._max_tokens(kwargs)
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        stops = self._stops(stop)
        if stops:
            params["ls_stop"] = stops
        return params


@dataclass
class StreamEnd:
    """What a stream tells, noted from its pieces for its last chunk: why it stopped, the model's name, the token
    usage, and its text (for an error that quotes it)."""

    finish_reason: str | None = None
    model: str | None = None
    usage: dict[str, int] | None = None
    texts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def note(self, piece: Completion) -> None:
        self.texts.append(piece.text)
        self.finish_reason = piece.finish_reason or self.finish_reason
        self.model = self.model or piece.model
        self.usage = piece.usage or self.usage

"""Sessions: a client's variables and calls on the server, and the graph of calls not yet submitted.

Each operation is written once, as a generator of HTTP requests (it yields a batch of requests and receives
their JSON bodies); the sync client runs a batch one request after the other, the async client concurrently.
So `Session` and `AsyncSession` differ only in how they wait.

Calls are submitted in batches: every call made inside a `graph()` block goes to the server in one request
when the block ends, so the server sees the whole DAG at once (a graph of more calls than the session may hold
unfinished goes in parts, in dependency order, each when the earlier calls have left room: the block's end then
waits until the last part is in). Outside a block a sync session submits each
call at once (raising the server's error there); an async session submits the calls made since its last
await, as one request, in a task (an error is raised by `aget()` of the calls' outputs).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from parrot_lc.frontend.api import ApiRequest, Steps
from parrot_lc.frontend.completions import usage_of
from parrot_lc.frontend.errors import (
    GraphError,
    IdleTimeoutError,
    InvalidRequestError,
    ParrotError,
    VariableTimeoutError,
)
from parrot_lc.frontend.template import Template, Text
from parrot_lc.frontend.variable import Criterion, SemanticVariable, check_criterion

if TYPE_CHECKING:
    from parrot_lc.frontend.client import AsyncParrotClient, ParrotClient, _ClientBase

T = TypeVar("T")
# Variables made by one request (the server takes up to 4,096): a graph's inputs and outputs in a round trip or few.
NEW_VARIABLES_PER_REQUEST = 1024
# A graph larger than the session's call limit goes in parts of at least this share of the limit (each part waits
# for that much room), so that few requests keep the session's queue nearly full.
PART_OF_LIMIT = 8
ROOM_WAIT_SECONDS = 30.0  # how long one room request is held open (asked again until there is room)


@dataclass(eq=False)
class GraphCall:
    """One call of a semantic function: its template with each placeholder bound to a variable."""

    template: Template
    bindings: dict[str, SemanticVariable]
    sampling: dict[str, dict[str, Any]]  # per output: the settings given (the server's defaults otherwise)
    call_id: str | None = None  # set once submitted

    @property
    def variables(self) -> list[SemanticVariable]:
        return [self.bindings[p.name] for p in self.template.placeholders]

    @property
    def outputs(self) -> list[SemanticVariable]:
        return [self.bindings[name] for name in self.template.outputs]

    def payload(self) -> dict[str, Any]:
        """The call as the server's API takes it (every variable must exist on the server)."""
        pieces: list[dict[str, Any]] = []
        for piece in self.template.pieces:
            if isinstance(piece, Text):
                pieces.append({"text": piece.text})
            elif piece.kind == "input":
                pieces.append({"input": self.bindings[piece.name].var_id})
            else:
                output: dict[str, Any] = {"output": self.bindings[piece.name].var_id}
                if self.sampling.get(piece.name):
                    output["sampling"] = self.sampling[piece.name]
                pieces.append(output)
        return {"template": pieces}


_current: ContextVar[BaseSession | None] = ContextVar("parrot_lc_current_session", default=None)


def current_session() -> BaseSession | None:
    """The session of the innermost `with session` (or `async with`) block, if any: where semantic functions
    called with plain strings only create their variables."""
    return _current.get()


class BaseSession:
    """What sync and async sessions share: the pending graph and the request steps of every operation."""

    _client: _ClientBase

    def __init__(self, session_id: str | None, session_token: str | None, idle_timeout: float | None = None) -> None:
        if (session_id is None) != (session_token is None):
            raise TypeError("a handle to an existing session needs both its session_id and its session_token")
        _check_idle_timeout(idle_timeout)
        self.idle_timeout = idle_timeout  # how long a graph submitted in parts may wait for room
        self.session_id = session_id
        self._token = session_token or ""
        self._closed = False
        self._pending: list[GraphCall] = []
        self._graph_depth = 0
        self._call_limit: int | None = None  # unfinished calls the server lets the session hold
        self._ended_calls = 0  # calls of the session seen ended (done or failed) by the last status a wait asked
        self._context_tokens: list[Token] = []

    @property
    def token(self) -> str | None:
        """The session token (with `session_id`, what another client needs to open a handle to it)."""
        return self._token or None

    def variable(self, name: str = "", value: str | None = None, *, var_id: str | None = None) -> SemanticVariable:
        """A new variable of this session, set to `value` if one is given; with `var_id`, a handle to a
        variable that exists on the server (made by another client of this session)."""
        if value is not None and not isinstance(value, str):
            raise TypeError(f"a variable's value is a str, not {type(value).__name__}")
        if value is not None and var_id is not None:
            raise TypeError("a handle to an existing variable (var_id) takes no value: set() it")
        variable = SemanticVariable(self, name, value)
        variable._var_id = var_id
        return variable

    # ---- the graph ----------------------------------------------------------------------------------

    def _add_call(self, call: GraphCall) -> None:
        """Adds a call to the graph; it is submitted now or when the enclosing graph block ends."""
        for variable in call.variables:
            if variable.session is not self:
                raise ValueError(f"{variable!r} belongs to another session")
        outputs = call.outputs
        for variable in outputs:
            if variable._producer is not None or variable._value is not None or outputs.count(variable) > 1:
                raise GraphError(f"{variable!r} already has a value or a call that produces it")
        for variable in outputs:
            variable._producer = call
        self._pending.append(call)
        if self._graph_depth == 0:
            self._submit_soon()

    def _submit_soon(self) -> None:
        raise NotImplementedError

    def _leave_graph(self, raised: bool) -> bool:
        """Ends one `graph()` block; True when the outermost one ended normally (time to submit). A block
        that raised drops the calls it made."""
        self._graph_depth -= 1
        if self._graph_depth > 0:
            return False
        if raised:
            self._discard_pending("the graph block raised before the call was submitted")
        return not raised

    def _discard_pending(self, reason: str) -> None:
        calls, self._pending = self._pending, []
        _fail_outputs(calls, ParrotError(reason))

    # ---- request steps --------------------------------------------------------------------------------

    def _request(self, method: str, *path: str, **kwargs: Any) -> ApiRequest:
        assert self.session_id is not None, "opened by _open_steps first"
        return ApiRequest(method, "/".join(("/api/sessions", self.session_id, *path)),
                          headers={"X-Session-Token": self._token}, **kwargs)

    def _open_steps(self) -> Steps[None]:
        if self._closed:
            raise ParrotError("this session is closed")
        if self.session_id is None:
            [body] = yield [ApiRequest("POST", "/api/sessions")]
            self.session_id, self._token = body["session_id"], body["session_token"]
            self._call_limit = body["call_limit"]

    def _create_steps(self, variables: Iterable[SemanticVariable]) -> Steps[None]:
        new = list(dict.fromkeys(v for v in variables if v._var_id is None))
        if not new:
            return
        yield from self._open_steps()
        try:
            parts = [new[i:i + NEW_VARIABLES_PER_REQUEST] for i in range(0, len(new), NEW_VARIABLES_PER_REQUEST)]
            bodies = yield [self._request("POST", "variables:batchCreate",
                                          json={"variables": [_creation(v) for v in part]}) for part in parts]
            var_ids = [made["var_id"] for body in bodies for made in body["variables"]]
        except InvalidRequestError as exc:
            if exc.status != 413 or len(new) == 1:
                raise
            # The values together pass the server's limit on a request's body: one request each, as each fits.
            bodies = yield [self._request("POST", "variables", json=_creation(v)) for v in new]
            var_ids = [made["var_id"] for made in bodies]
        for variable, var_id in zip(new, var_ids):
            variable._var_id = var_id

    def _flush_steps(self) -> Steps[None]:
        """Submits the pending calls: in one request, or, for a graph larger than the session may hold unfinished,
        in parts, each when the earlier calls have left it room (so this waits until the last part is in)."""
        calls, self._pending = self._pending, []
        if not calls:
            return
        submitted = 0
        try:
            yield from self._open_steps()
            yield from self._create_steps(v for call in calls for v in call.variables)
            limit = yield from self._call_limit_steps()
            if len(calls) <= limit:
                yield from self._submit_steps(calls)
                return
            calls = _in_dependency_order(calls)  # no part waits for a later part's values
            wait = ROOM_WAIT_SECONDS if self.idle_timeout is None else min(ROOM_WAIT_SECONDS, self.idle_timeout)
            since = time.monotonic()  # the last part's submission: room comes as the session's calls end
            while submitted < len(calls):
                left = len(calls) - submitted
                room, limit = yield from self._room_steps(min(left, max(1, limit // PART_OF_LIMIT)), wait)
                part = calls[submitted:submitted + min(left, room)]
                if part:
                    yield from self._submit_steps(part)
                    submitted += len(part)
                    since = time.monotonic()
                elif self.idle_timeout is not None and time.monotonic() - since >= self.idle_timeout:
                    waited = time.monotonic() - since
                    raise IdleTimeoutError(
                        f"no room came for the graph's next part for {waited:.1f} s, the idle timeout "
                        f"({self.idle_timeout:g} s): none of the session's calls ended; {left} of its {len(calls)} "
                        "calls were not submitted", waited=waited, missing=left)
        except BaseException as exc:  # an interrupted wait for room too: no unsubmitted output may wait forever
            _fail_outputs(calls[submitted:], exc if isinstance(exc, ParrotError) else
                          ParrotError(f"the graph's submission stopped before the call was submitted: {exc!r}"))
            raise

    def _submit_steps(self, calls: list[GraphCall]) -> Steps[None]:
        [body] = yield [self._request("POST", "calls", json={"calls": [c.payload() for c in calls]})]
        for call, call_id in zip(calls, body["call_ids"]):
            call.call_id = call_id

    def _call_limit_steps(self) -> Steps[int]:
        if self._call_limit is None:  # a handle to a session another client opened
            _, self._call_limit = yield from self._room_steps(0)
        return self._call_limit

    def _room_steps(self, calls: int, wait: float = 0.0) -> Steps[tuple[int, int]]:
        """(room, limit): waits up to `wait` seconds until `calls` more calls fit in the session."""
        [body] = yield [self._request("GET", "room", params={"calls": calls, "timeout": wait},
                                      timeout=self._client._long_poll_timeout(wait))]
        return body["room"], body["limit"]

    def _set_steps(self, variable: SemanticVariable, value: str) -> Steps[None]:
        if variable._producer is not None:
            raise GraphError(f"{variable!r} is produced by a call: it cannot be set")
        if variable._var_id is None and variable._value is None:
            variable._value = value  # created with its value: one request
            try:
                yield from self._create_steps([variable])
            except ParrotError:
                variable._value = None
                raise
        else:
            yield from self._create_steps([variable])
            yield [self._request("PUT", "variables", variable._var_id, json={"value": value})]
            variable._value = value

    def _prepare_fetch_steps(self, variable: SemanticVariable) -> Steps[None]:
        if variable._producer is not None and variable._producer.call_id is None and variable._error is None:
            # Fetched inside the graph block that produces it: submit the calls made so far.
            yield from self._flush_steps()
        if variable._error is not None:
            raise variable._error
        yield from self._open_steps()
        yield from self._create_steps([variable])

    def _fetch_steps(self, variable: SemanticVariable, criterion: str, timeout: float | None,
                     http_timeout: httpx.Timeout) -> Steps[str]:
        params: dict[str, Any] = {"criterion": criterion}
        if timeout is not None:
            params["timeout"] = timeout
        [body] = yield [self._request("GET", "variables", variable.var_id, params=params, timeout=http_timeout)]
        variable._value = body["value"]
        variable._generated = {"finish_reason": body.get("finish_reason"), "stop_reason": body.get("stop_reason"),
                               "usage": usage_of(body)}
        return variable._value

    def _checked_fetches(self, variables: Iterable[SemanticVariable], criterion: str,
                         idle_timeout: float | None) -> list[SemanticVariable]:
        variables = list(variables)
        for variable in variables:
            if variable.session is not self:
                raise ValueError(f"{variable!r} belongs to another session")
        check_criterion(criterion)
        _check_idle_timeout(idle_timeout)
        return variables

    def _prepare_fetches_steps(self, variables: list[SemanticVariable]) -> Steps[None]:
        for variable in variables:
            if variable._value is None:
                yield from self._prepare_fetch_steps(variable)

    def _values_steps(self, variables: list[SemanticVariable], criterion: str,
                      idle_timeout: float | None) -> Steps[list[str]]:
        """Fetches the variables in turn, each fetch waiting up to `idle_timeout`. One that ends without its value
        asks the session's status whether any call ended meanwhile (a later variable's, say): if one did, the wait
        goes on; if none did since the wait's last look (or since it began), none of the session's values arrived
        for `idle_timeout` seconds: IdleTimeoutError. So it never fails while values arrive, and fails between one
        and two idle timeouts after the last one."""
        http_timeout = self._client._long_poll_timeout(idle_timeout)
        ended = self._ended_calls  # as of this wait's start or before: a call ended later is progress
        since = time.monotonic()
        for variable in variables:
            while variable._value is None:
                try:
                    yield from self._fetch_steps(variable, criterion, idle_timeout, http_timeout)
                except VariableTimeoutError:
                    if idle_timeout is None:
                        raise
                    status = yield from self._status_steps()
                    calls = status["calls"]
                    if calls["done"] + calls["failed"] <= ended:
                        raise _idle_timeout_error(status, idle_timeout, time.monotonic() - since) from None
                    ended = calls["done"] + calls["failed"]
                    self._ended_calls = max(self._ended_calls, ended)
                since = time.monotonic()
        return [variable._value for variable in variables]

    def _status_steps(self) -> Steps[dict[str, Any]]:
        yield from self._open_steps()
        [body] = yield [self._request("GET")]
        return body

    def _close_steps(self) -> Steps[None]:
        self._discard_pending("the session was closed before the call was submitted")
        if self._closed or self.session_id is None:
            self._closed = True
            return
        self._closed = True
        yield [self._request("DELETE")]

    # ---- the current session ------------------------------------------------------------------------

    def _enter(self) -> None:
        self._context_tokens.append(_current.set(self))

    def _exit(self) -> None:
        _current.reset(self._context_tokens.pop())


class Session(BaseSession):
    """A session of a ParrotClient: `with client.session() as session:` opens it on the server and deletes
    it (cancelling its calls) at the end. Inside the block, semantic functions called with plain strings
    create their variables in it. Fetches may wait in several threads at once (`aget()` waits in one)."""

    def __init__(self, client: ParrotClient, session_id: str | None = None, session_token: str | None = None,
                 idle_timeout: float | None = None) -> None:
        super().__init__(session_id, session_token, idle_timeout)
        self._client = client
        self._lock = threading.Lock()

    def _run(self, steps: Steps[T]) -> T:
        with self._lock:
            return self._client._drive(steps)

    def open(self) -> Session:
        """Creates the session on the server (done on first use otherwise)."""
        self._run(self._open_steps())
        return self

    def close(self) -> None:
        """Deletes the session on the server: its calls are cancelled and its variables are gone."""
        self._run(self._close_steps())

    def flush(self) -> None:
        """Submits the calls not yet submitted (those of an unfinished graph block), as one request (or in parts)."""
        self._run(self._flush_steps())

    def status(self) -> dict[str, Any]:
        """`{"session_id", "variables": count, "calls": {"waiting", "running", "done", "failed": count},
        "graph": [{"call_id", "inputs", "outputs", "state", "latency_critical", "task_group"}]}`."""
        return self._run(self._status_steps())

    @contextmanager
    def graph(self) -> Iterator[Session]:
        """Calls made in the block are submitted together, in one request, when it ends (the server sees
        the whole DAG at once). If the block raises, they are dropped."""
        self._graph_depth += 1
        try:
            yield self
        except BaseException:
            self._leave_graph(raised=True)
            raise
        if self._leave_graph(raised=False):
            self.flush()

    def _submit_soon(self) -> None:
        self.flush()

    def _get_value(self, variable: SemanticVariable, criterion: str, timeout: float | None) -> str:
        if variable._value is not None:
            return variable._value
        self._run(self._prepare_fetch_steps(variable))
        # The long poll holds no lock: other threads may set or fetch variables meanwhile.
        return self._client._drive(self._fetch_steps(variable, criterion, timeout,
                                                     self._client._long_poll_timeout(timeout)))

    async def _aget_value(self, variable: SemanticVariable, criterion: str, timeout: float | None) -> str:
        return await asyncio.to_thread(self._get_value, variable, criterion, timeout)

    def get_values(self, variables: Iterable[SemanticVariable], criterion: Criterion = "latency",
                   idle_timeout: float | None = None) -> list[str]:
        """The values of `variables` (in order), waiting for them: the outputs of a run of many calls, whose last
        values may come long after its first (its calls queue on the server). With `idle_timeout` (seconds), raises
        IdleTimeoutError (a VariableTimeoutError) once no value arrived for that long: no call of the session ended,
        as on a server that stopped answering; None waits without limit. `criterion` as for `get()`; a failed call
        raises CallFailedError."""
        variables = self._checked_fetches(variables, criterion, idle_timeout)
        self._run(self._prepare_fetches_steps(variables))
        # The long polls hold no lock, as a single fetch's.
        return self._client._drive(self._values_steps(variables, criterion, idle_timeout))

    def _set_value(self, variable: SemanticVariable, value: str) -> None:
        self._run(self._set_steps(variable, value))

    async def _aset_value(self, variable: SemanticVariable, value: str) -> None:
        await asyncio.to_thread(self._set_value, variable, value)

    def __enter__(self) -> Session:
        self._enter()
        try:
            return self.open()
        except BaseException:
            self._exit()
            raise

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        finally:
            self._exit()


class AsyncSession(BaseSession):
    """A session of an AsyncParrotClient: `async with client.session() as session:`; the same API as
    `Session`, with `await` on what talks to the server (`aclose`, `flush`, `status`, `graph`)."""

    def __init__(self, client: AsyncParrotClient, session_id: str | None = None,
                 session_token: str | None = None, idle_timeout: float | None = None) -> None:
        super().__init__(session_id, session_token, idle_timeout)
        self._client = client
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _run(self, steps: Steps[T]) -> T:
        async with self._lock:
            return await self._client._drive(steps)

    async def open(self) -> AsyncSession:
        """Creates the session on the server (done on first use otherwise)."""
        await self._run(self._open_steps())
        return self

    async def aclose(self) -> None:
        """Deletes the session on the server: its calls are cancelled and its variables are gone."""
        await self._run(self._close_steps())

    async def flush(self) -> None:
        """Submits the calls not yet submitted, as one request (or in parts)."""
        await self._run(self._flush_steps())

    async def status(self) -> dict[str, Any]:
        """`{"session_id", "variables": count, "calls": {"waiting", "running", "done", "failed": count},
        "graph": [{"call_id", "inputs", "outputs", "state", "latency_critical", "task_group"}]}`."""
        return await self._run(self._status_steps())

    @asynccontextmanager
    async def graph(self) -> AsyncIterator[AsyncSession]:
        """Calls made in the block are submitted together, in one request, when it ends. If the block
        raises, they are dropped."""
        self._graph_depth += 1
        try:
            yield self
        except BaseException:
            self._leave_graph(raised=True)
            raise
        if self._leave_graph(raised=False):
            await self.flush()

    def _add_call(self, call: GraphCall) -> None:
        if self._graph_depth == 0:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError("an async session submits calls from its event loop: call semantic "
                                   "functions in a coroutine, or in `async with session.graph()`") from None
        super()._add_call(call)

    def _submit_soon(self) -> None:
        # Calls made before the task runs go in the same request (the first flush takes them all).
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)  # the loop keeps only a weak reference to tasks
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here: the error is kept on the outputs and raised by their aget()

    def _get_value(self, variable: SemanticVariable, criterion: str, timeout: float | None) -> str:
        raise TypeError(f"{variable!r} belongs to an async session: use `await variable.aget()`")

    async def _aget_value(self, variable: SemanticVariable, criterion: str, timeout: float | None) -> str:
        if variable._value is not None:
            return variable._value
        await self._run(self._prepare_fetch_steps(variable))
        return await self._client._drive(self._fetch_steps(variable, criterion, timeout,
                                                           self._client._long_poll_timeout(timeout)))

    async def get_values(self, variables: Iterable[SemanticVariable], criterion: Criterion = "latency",
                         idle_timeout: float | None = None) -> list[str]:
        """See `Session.get_values`."""
        variables = self._checked_fetches(variables, criterion, idle_timeout)
        await self._run(self._prepare_fetches_steps(variables))
        return await self._client._drive(self._values_steps(variables, criterion, idle_timeout))

    def _set_value(self, variable: SemanticVariable, value: str) -> None:
        raise TypeError(f"{variable!r} belongs to an async session: use `await variable.aset(value)`")

    async def _aset_value(self, variable: SemanticVariable, value: str) -> None:
        await self._run(self._set_steps(variable, value))

    async def __aenter__(self) -> AsyncSession:
        self._enter()
        try:
            return await self.open()
        except BaseException:
            self._exit()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.aclose()
        finally:
            self._exit()


def _creation(variable: SemanticVariable) -> dict[str, Any]:
    body: dict[str, Any] = {"name": variable.name}
    if variable._value is not None:
        body["value"] = variable._value
    return body


def _idle_timeout_error(status: dict[str, Any], idle_timeout: float, waited: float) -> IdleTimeoutError:
    outputs = [(node["state"], len(node["outputs"])) for node in status["graph"]]
    missing = sum(count for state, count in outputs if state in ("waiting", "running"))
    total = sum(count for _, count in outputs)
    return IdleTimeoutError(f"no value arrived for {waited:.1f} s, the idle timeout ({idle_timeout:g} s): {missing} "
                            f"of the session's {total} call outputs are still missing", waited=waited, missing=missing)


def _check_idle_timeout(idle_timeout: float | None) -> None:
    if idle_timeout is not None and not 0 < idle_timeout < math.inf:
        raise ValueError(f"idle_timeout must be a positive number of seconds, or None; got {idle_timeout}")


def _fail_outputs(calls: list[GraphCall], error: ParrotError) -> None:
    for call in calls:
        for variable in call.outputs:
            variable._error = error


def _in_dependency_order(calls: list[GraphCall]) -> list[GraphCall]:
    """The calls, each after those of the list that produce its inputs, otherwise in the order they were made."""
    pending = set(calls)
    ordered: list[GraphCall] = []
    placed: set[GraphCall] = set()
    visiting: set[GraphCall] = set()  # a cycle (which the server refuses) must not loop here
    for root in calls:
        stack = [(root, False)]
        while stack:
            call, inputs_placed = stack.pop()
            if call in placed or (not inputs_placed and call in visiting):
                continue
            if inputs_placed:
                placed.add(call)
                ordered.append(call)
                continue
            visiting.add(call)
            stack.append((call, True))
            producers = [v._producer for v in call.variables if v._producer is not call]
            stack.extend((p, False) for p in reversed(producers) if p in pending and p not in placed)
    return ordered
